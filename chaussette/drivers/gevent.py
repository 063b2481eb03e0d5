"""FastCGI and SCGI on gevent: a greenlet per connection, a greenlet per request.

Requests run in a ``gevent.pool.Pool`` of ``--spawn`` greenlets (default 1000); when it is
full the connection readers wait, reading no new request. Connections are bounded by
``--max-conns`` (an SCGI connection takes one of the ``--spawn`` places once its header
block is complete). The standard library is monkey-patched before
the app is imported unless ``--no-monkey``, as the gevent HTTP backend does; the listener is
served through a gevent socket on a duplicate of its descriptor.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.lock
import gevent.select
import gevent.socket

from chaussette.backends.gevent import GreenServer, _route_hub_errors
from chaussette.drivers.engine import (
    Acceptor,
    Engine,
    FdWatcher,
    Flag,
    GreenAcceptor,
    Handler,
    Pool,
)
from chaussette.drivers.fastcgi import FastCGIConnection
from chaussette.drivers.scgi import SCGIConnection
from chaussette.drivers.server import ProtocolServer

if TYPE_CHECKING:
    from chaussette.settings import Settings


class GeventPool:
    """At most ``size`` greenlets at once; ``submit`` waits for a place."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sem = gevent.lock.BoundedSemaphore(size)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.sem.acquire()
        gevent.spawn(self._run, fn, args)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        finally:
            self.sem.release()

    def wait_available(self, timeout: float | None = None) -> bool:
        return bool(self.sem.wait(timeout))

    def acquire(self) -> None:
        self.sem.acquire()

    def release(self) -> None:
        self.sem.release()

    def active(self) -> int:
        return self.size - int(self.sem.counter)

    def close(self) -> None:
        return


class GeventWatcher:
    """The hub's own I/O watchers: a callback in the hub when a descriptor is readable.

    A connection gives back its previous watcher (``reuse``): making one per request costs
    an ``fcntl`` (libev checks the descriptor) and an object; starting a stopped one is
    free. A stopped watcher is dropped with its connection."""

    def __init__(self) -> None:
        self.loop = gevent.get_hub().loop

    def watch(self, fd: int, callback: Callable[[], None], reuse: Any = None) -> Any:
        io = reuse if reuse is not None else self.loop.io(fd, 1)
        io.start(self._fire, io, callback)
        return io

    @staticmethod
    def _fire(io: Any, callback: Callable[[], None]) -> None:
        io.stop()
        callback()

    def unwatch(self, io: Any) -> None:
        io.stop()


class GeventEngine(Engine):
    name = "gevent"
    multithread = False
    cooperative = True

    def flag(self) -> Flag:
        event: Flag = gevent.event.Event()
        return event

    def lock(self) -> AbstractContextManager[Any]:
        lock: AbstractContextManager[Any] = gevent.lock.Semaphore(1)
        return lock

    def pool(self, size: int, idle_timeout: float | None, name: str) -> Pool:
        return GeventPool(size)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        gevent.spawn(fn, *args)

    def sleep(self, seconds: float) -> None:
        gevent.sleep(seconds)

    def start_acceptor(self, sock: socket.socket, pool: Pool, handle: Handler) -> Acceptor:
        _route_hub_errors(gevent.get_hub())
        green = gevent.socket.socket(fileno=os.dup(sock.fileno()))
        return GreenAcceptor(green, pool, handle, gevent.spawn, gevent.sleep)

    def wait_readable(self, fd: int, timeout: float | None) -> None:
        gevent.select.select([fd], [], [], timeout)

    def watcher(self) -> FdWatcher | None:
        return GeventWatcher()

    def receiver(self, sock: Any) -> Callable[[int], bytes]:
        """Wait for the descriptor to be readable, then read: a connection's next request
        is seldom there yet when the reader comes back for it, and gevent's ``recv``
        would first try (a syscall failing with EAGAIN, an exception) and then wait.
        A socket given a timeout (the linger after our FIN) reads the usual way."""
        hub = gevent.get_hub()
        io = hub.loop.io(sock.fileno(), 1)
        wait = hub.wait
        recv = sock.recv

        def receive(size: int) -> bytes:
            if sock.timeout is None:
                wait(io)
            data: bytes = recv(size)
            return data

        return receive


class _GeventServer(ProtocolServer):
    engine_class = GeventEngine

    @classmethod
    def prepare(cls, settings: Settings) -> None:
        GreenServer.prepare(settings)  # the same monkey-patching as the HTTP backend


class FastCGIServer(_GeventServer):
    protocol = "fastcgi"
    connection = FastCGIConnection
    multiplexing = True


class SCGIServer(_GeventServer):
    protocol = "scgi"
    connection = SCGIConnection
    multiplexing = False
