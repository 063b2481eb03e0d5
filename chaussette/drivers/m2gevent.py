"""The Mongrel2 handler on gevent: tasks are greenlets (at most --spawn running requests).

The standard library is monkey-patched before the app is imported unless ``--no-monkey``,
as the gevent HTTP backend does. The ZeroMQ sockets are pyzmq's own, used without blocking:
a greenlet that must wait watches the socket's descriptor in gevent's hub. (``zmq.green``
does the same, at about twice the cost per message, measured with bench/mongrel2.py.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gevent
import gevent.select
import gevent.socket

from chaussette.backends.gevent import GreenServer, _route_hub_errors
from chaussette.drivers.gevent import GeventEngine
from chaussette.drivers.mongrel2 import Mongrel2Server as _Mongrel2Server

if TYPE_CHECKING:
    from chaussette.settings import Settings


class Mongrel2Server(_Mongrel2Server):
    engine_class = GeventEngine
    blocking = False

    @classmethod
    def prepare(cls, settings: Settings) -> None:
        GreenServer.prepare(settings)  # the same monkey-patching as the HTTP backend

    def start(self) -> None:
        _route_hub_errors(gevent.get_hub())
        super().start()

    def wait_fd(self, fd: int, timeout: float) -> None:
        try:
            gevent.socket.wait_read(fd, timeout)
        except TimeoutError:
            pass

    def wait_fds(self, fds: tuple[int, ...], timeout: float) -> None:
        gevent.select.select(fds, (), (), timeout)
