"""A module whose own import fails: the user must see this file in the traceback."""

from __future__ import annotations

import load_no_such_dependency  # noqa: F401  (the line the traceback must show)

from tests.apps.load_pkg import labelled

app = labelled("never")
