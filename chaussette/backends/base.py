"""What the lifecycle expects of a backend adapter."""

from __future__ import annotations

import abc
import fcntl
import select
import struct
import termios
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chaussette.settings import Settings
    from chaussette.sockets import Listener
    from chaussette.wsgi import WSGIApp

# In a drain, a connection accepted but still silent may have its request on the way: it
# gets this long to send it before it is closed (closing it unread would lose that request,
# which no other process can take over).
FRESH_GRACE = 1.0  # seconds


def pending_bytes(sock: Any) -> int:
    """Bytes the kernel holds for us to read on a connection, a socket or its descriptor
    (0 when unknown or closed)."""
    try:
        fd = sock if isinstance(sock, int) else sock.fileno()
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError, AttributeError):
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


class Server(abc.ABC):
    """A backend adapter.

    The launcher calls ``prepare`` (class method) before the app is imported — the place to
    monkey-patch. The lifecycle then calls, in order: ``start`` (serve in the background and
    return), then on a stop ``stop_accepting``, ``wait_idle`` until in-flight work is done
    or the graceful timeout passes, and ``close``. Meanwhile the main thread waits for
    signals with ``wait_readable``: a greenlet backend makes that wait cooperative so its
    hub keeps serving.
    """

    @classmethod
    def prepare(cls, settings: Settings) -> None:
        """Runs before the application is imported (e.g. gevent monkey-patching)."""
        return

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        self.app = app
        self.listener = listener
        self.settings = settings

    @abc.abstractmethod
    def start(self) -> None:
        """Start serving; return at once."""

    @abc.abstractmethod
    def stop_accepting(self) -> None:
        """Accept no new connection. The listening socket stays open (a manager or a
        re-exec may still need it); requests already accepted go on."""

    @abc.abstractmethod
    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for in-flight requests; True when none is left."""

    @abc.abstractmethod
    def in_flight(self) -> int:
        """Requests (or connections) being served now."""

    def wait_readable(self, fd: int, timeout: float | None) -> None:
        """Block the main thread until ``fd`` is readable or ``timeout`` passes."""
        select.select([fd], [], [], timeout)

    def close(self) -> None:  # noqa: B027 (optional hook: most adapters hold nothing)
        """Release what the adapter holds. Unfinished requests are abandoned."""
