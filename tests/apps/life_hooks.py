"""--pre-hook / --post-hook callables of the lifecycle tests.

Each hook writes what it saw into the directory named by LIFE_HOOK_DIR, so that the test
can check from outside that it ran, with which settings, and when.
"""

from __future__ import annotations

import os
import socket


def _write(name: str, text: str) -> None:
    with open(os.path.join(os.environ["LIFE_HOOK_DIR"], name), "w") as f:
        f.write(text)


def pre(settings) -> None:
    _write("pre", f"{settings.port} {settings.app} {os.getpid()}")


def post(settings) -> None:
    """Records the port and whether the server still accepts connections (it must not)."""
    with socket.socket() as probe:
        probe.settimeout(2)
        try:
            probe.connect(("127.0.0.1", settings.port))
            state = "accepting"
        except OSError:
            state = "closed"
    _write("post", f"{settings.port} {state} {os.getpid()}")


def refuse(settings) -> None:
    raise RuntimeError(f"pre-hook refuses port {settings.port}")


def broken_post(settings) -> None:
    raise ValueError("post-hook failed")
