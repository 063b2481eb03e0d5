"""A module that raises while it is imported."""

from __future__ import annotations

from tests.apps.load_pkg import labelled

app = labelled("never")
raise RuntimeError("load_pkg.raises: configuration is missing")
