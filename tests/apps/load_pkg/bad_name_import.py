"""A module whose own ``from ... import`` fails with a plain ImportError."""

from __future__ import annotations

from tests.apps.load_pkg import no_such_name  # noqa: F401  (the line the traceback must show)
