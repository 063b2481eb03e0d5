"""Errors shared by the protocol cores."""

from __future__ import annotations

__all__ = ["RemoteProtocolError"]


class RemoteProtocolError(Exception):
    """The peer broke the protocol; the message says how.

    Once a core has raised it, that connection is dead: the driver logs the message once and
    closes the connection. Other connections are not affected.
    """
