"""The Mongrel2 handler on eventlet: tasks are green threads (at most --spawn running
requests). The standard library is monkey-patched before the app is imported unless
``--no-monkey``, as the eventlet HTTP backend does. The ZeroMQ sockets are pyzmq's own, used
without blocking: a green thread that must wait watches the socket's descriptor in
eventlet's hub."""

from __future__ import annotations

from typing import TYPE_CHECKING

# the HTTP backend imports eventlet with its deprecation warning filtered: use it first
from chaussette.backends.eventlet import EventletServer

import eventlet.hubs  # isort: skip
from eventlet.green import select as green_select  # isort: skip

from chaussette.drivers.eventlet import EventletEngine
from chaussette.drivers.mongrel2 import Mongrel2Server as _Mongrel2Server

if TYPE_CHECKING:
    from chaussette.settings import Settings


class _Timeout(Exception):
    pass


class Mongrel2Server(_Mongrel2Server):
    engine_class = EventletEngine
    blocking = False

    @classmethod
    def prepare(cls, settings: Settings) -> None:
        EventletServer.prepare(settings)  # the same monkey-patching as the HTTP backend

    def wait_fd(self, fd: int, timeout: float) -> None:
        try:
            eventlet.hubs.trampoline(fd, read=True, timeout=timeout, timeout_exc=_Timeout)
        except _Timeout:
            pass

    def wait_fds(self, fds: tuple[int, ...], timeout: float) -> None:
        green_select.select(fds, (), (), timeout)
