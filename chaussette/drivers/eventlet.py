"""FastCGI and SCGI on eventlet: a green thread per connection, one per request.

Requests run in an ``eventlet.GreenPool`` of ``--spawn`` green threads (default 1000); when
it is full the connection readers wait, reading no new request. Connections are bounded by
``--max-conns`` (an SCGI connection takes one of the ``--spawn`` places once its header
block is complete). The standard library is monkey-patched before
the app is imported unless ``--no-monkey``; the listener is served through a green socket on
a duplicate of its descriptor.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

# the HTTP backend imports eventlet with its deprecation warning filtered: use it first
from chaussette.backends.eventlet import EventletServer

import eventlet  # isort: skip
import eventlet.event  # isort: skip
import eventlet.greenio  # isort: skip
import eventlet.semaphore  # isort: skip
from eventlet.green import select as green_select  # isort: skip

from chaussette.drivers.engine import Acceptor, Engine, Flag, GreenAcceptor, Handler, Pool
from chaussette.drivers.fastcgi import FastCGIConnection
from chaussette.drivers.scgi import SCGIConnection
from chaussette.drivers.server import ProtocolServer

if TYPE_CHECKING:
    from chaussette.settings import Settings


class EventletFlag:
    """``threading.Event`` semantics over eventlet's one-shot events."""

    def __init__(self) -> None:
        self._event = eventlet.event.Event()

    def set(self) -> None:
        if not self._event.ready():
            self._event.send(True)

    def clear(self) -> None:
        if self._event.ready():
            self._event = eventlet.event.Event()

    def is_set(self) -> bool:
        return bool(self._event.ready())

    def wait(self, timeout: float | None = None) -> bool:
        event = self._event
        if event.ready():
            return True
        with eventlet.Timeout(timeout, False):
            event.wait()
        return bool(event.ready())


class EventletPool:
    def __init__(self, size: int) -> None:
        self.pool = eventlet.GreenPool(size)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.pool.spawn_n(fn, *args)

    def wait_available(self, timeout: float | None = None) -> bool:
        with eventlet.Timeout(timeout, False), self.pool.sem:
            return True
        return False

    def acquire(self) -> None:
        self.pool.sem.acquire()

    def release(self) -> None:
        self.pool.sem.release()

    def active(self) -> int:
        size: int = self.pool.size
        return size - int(self.pool.sem.counter)

    def close(self) -> None:
        return


class EventletEngine(Engine):
    name = "eventlet"
    multithread = False
    cooperative = True

    def flag(self) -> Flag:
        return EventletFlag()

    def lock(self) -> AbstractContextManager[Any]:
        lock: AbstractContextManager[Any] = eventlet.semaphore.Semaphore(1)
        return lock

    def pool(self, size: int, idle_timeout: float | None, name: str) -> Pool:
        return EventletPool(size)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        eventlet.spawn_n(fn, *args)

    def sleep(self, seconds: float) -> None:
        eventlet.sleep(seconds)

    def start_acceptor(self, sock: socket.socket, pool: Pool, handle: Handler) -> Acceptor:
        return GreenAcceptor(
            eventlet.greenio.GreenSocket(
                eventlet.patcher.original("socket").socket(fileno=os.dup(sock.fileno()))
            ),
            pool,
            handle,
            eventlet.spawn,
            eventlet.sleep,
        )

    def wait_readable(self, fd: int, timeout: float | None) -> None:
        green_select.select([fd], [], [], timeout)


class _EventletServer(ProtocolServer):
    engine_class = EventletEngine

    @classmethod
    def prepare(cls, settings: Settings) -> None:
        EventletServer.prepare(settings)  # the same monkey-patching as the HTTP backend


class FastCGIServer(_EventletServer):
    protocol = "fastcgi"
    connection = FastCGIConnection
    multiplexing = True


class SCGIServer(_EventletServer):
    protocol = "scgi"
    connection = SCGIConnection
    multiplexing = False
