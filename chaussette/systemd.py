"""systemd socket activation and readiness notification, with the standard library only.

- ``listen_fds()``: the fds systemd passed (LISTEN_FDS, starting at fd 3), only when
  LISTEN_PID names this process; the variables are then removed so that our children do
  not believe the sockets are theirs.
- ``notify(state)``: one datagram to NOTIFY_SOCKET (a path, or '@' for the abstract
  namespace); a no-op without it. Never raises: readiness is advice, not a reason to die.
- ``reloading()``: RELOADING=1 with the MONOTONIC_USEC= that systemd (253+, for
  ``Type=notify-reload``) needs in the same datagram to match the reload with the READY=1
  that ends it.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("chaussette")

SD_LISTEN_FDS_START = 3


def listen_fds(unset: bool = True) -> list[int]:
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not count or not pid:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid, count)
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(n, 0)))


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; True if a datagram was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %s to %s failed: %s", state, address, exc)
        return False
    return True


def reloading() -> bool:
    """Tell systemd a reload starts; READY=1 must follow once it is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
