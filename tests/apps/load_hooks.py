"""--pre-hook / --post-hook callables. Each appends a line to the file named by the
LOAD_HOOK_MARKER environment variable, so that a test can see what ran, in which order,
with which settings."""

from __future__ import annotations

import os


def _mark(text: str) -> None:
    with open(os.environ["LOAD_HOOK_MARKER"], "a") as f:
        f.write(text + "\n")


def pre(settings) -> None:
    _mark(f"pre {settings.app} port={settings.port}")


def post(settings) -> None:
    _mark(f"post {settings.app}")


def fail(settings) -> None:
    _mark("fail")
    raise RuntimeError("the database is not reachable")


NOT_A_HOOK = "just a string"
