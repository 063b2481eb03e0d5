"""The websocket backends: the ``gevent`` backend (pywsgi, the pool, the drain) with a
websocket library on top.

``geventwebsocket``
    gevent-websocket's ``WebSocketHandler``: an upgrade request reaches the app with
    ``environ['wsgi.websocket']``. Two faults of gevent-websocket 0.10 are mended here:
    its close frame carries the reason but no status code, so every peer saw 1005 (no
    status) instead of 1000 (and a reason arrived as ``"b'...'"``); and it keyed live
    websockets by client address, which is the same empty name for every client of a unix
    socket (the second one to end raised KeyError).
``geventws4py``
    ws4py's handshake app (``WebSocketWSGIApplication``) puts a ``ws4py.websocket`` in the
    environ; the handler runs it in the connection's own greenlet, so the pool bounds and
    counts websockets like requests. ws4py's gevent server meant to send close frames at
    shutdown but reads a Python 2 attribute and sends nothing on Python 3.
``socketio``
    python-socketio (``socketio.WSGIApp``, or any app around it) on the geventwebsocket
    handler, in gevent mode: a ``socketio.Server`` created without ``async_mode`` gets
    ``'gevent'`` (engineio would otherwise pick eventlet when it is installed, which cannot
    run here); one created with another mode is refused before serving.

What the three share:

- after the upgrade ``--timeout`` no longer applies (a websocket may rightly stay silent for
  hours); TCP keep-alive probes find a peer that vanished without a FIN instead;
- the app returning ends the websocket with 1000, an app that raised ends it with 1011;
- a drain (SIGTERM, SIGHUP) sends every open websocket a close frame with 1001 (going
  away) and keeps reading, so the app sees the client's answer as an ordinary close and
  returns; clients reconnect to whoever serves the socket next. A websocket upgraded
  during a drain gets the same at once; a peer that does not answer within --timeout is
  cut. socket.io long-polls in flight are answered at once (a NOOP packet), so polling
  clients do not hold the drain either.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import gevent

from chaussette.backends.gevent import GeventServer, HandlerMixin
from chaussette.errors import UsageError

if TYPE_CHECKING:
    from chaussette.settings import Settings
    from chaussette.sockets import Listener
    from chaussette.wsgi import WSGIApp

log = logging.getLogger("chaussette")
ws_log = logging.getLogger("chaussette.websocket")

GOING_AWAY = 1001
INTERNAL_ERROR = 1011
_SHUTDOWN_REASON = "server shutting down"
_MAX_REASON = 123  # a close frame's payload is at most 125 bytes, 2 of them the code

# TCP keep-alive on a websocket: first probe after this many idle seconds, then every
# _KEEPALIVE_INTERVAL seconds, the connection dropped after _KEEPALIVE_PROBES unanswered.
_KEEPALIVE_IDLE = 60
_KEEPALIVE_INTERVAL = 10
_KEEPALIVE_PROBES = 6


def close_payload(code: int | None, reason: bytes | str | None) -> bytes:
    """A close frame's payload: the code (network order) and the reason, cut to fit on a
    UTF-8 character boundary. No code, no payload."""
    if code is None:
        return b""
    data = reason.encode("utf-8") if isinstance(reason, str) else bytes(reason or b"")
    if len(data) > _MAX_REASON:
        data = data[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + data


class WebSocketServer(GeventServer):
    """pywsgi with a websocket handler: what the websocket backends share."""

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        super().__init__(app, listener, settings)
        self.websockets: dict[Any, Any] = {}  # open websocket -> its socket, for a drain

    def going_away(self, ws: Any) -> None:
        """Start the closing handshake of ``ws`` with 1001, reading on."""
        raise NotImplementedError

    @contextmanager
    def session(self, ws: Any, sock: Any) -> Iterator[None]:
        """Around a websocket's life on ``sock``: no --timeout, keep-alive probes, tracked
        for a drain (and told to go away at once when a drain has begun)."""
        try:
            sock.settimeout(None)
            if self.tcp:
                _keep_alive(sock)
        except OSError:
            pass  # already gone: the first read says so
        self.websockets[ws] = sock
        try:
            if self.connections.draining:
                self._go_away(ws, sock)
            yield
        finally:
            self.websockets.pop(ws, None)

    def stop_accepting(self) -> None:
        super().stop_accepting()
        for ws, sock in list(self.websockets.items()):
            self._go_away(ws, sock)

    def _go_away(self, ws: Any, sock: Any) -> None:
        """Send 1001; a peer that does not answer within --timeout is cut (the drain must
        not wait on a peer that vanished)."""
        try:
            self.going_away(ws)
        except Exception:
            log.exception("could not close a websocket for the drain")
        if self.timeout:
            gevent.spawn_later(self.timeout, self._cut, ws, sock)

    def _cut(self, ws: Any, sock: Any) -> None:
        if ws not in self.websockets:
            return  # ended in time
        ws_log.info("a websocket did not answer the close frame in %ss: cut", self.timeout)
        try:
            sock.shutdown(socket.SHUT_RDWR)  # its reader wakes up and ends
        except OSError:
            pass


def _keep_alive(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", _KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", _KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", _KEEPALIVE_PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _no_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
    """start_response once the 101 is sent: nothing more can go out as HTTP."""
    return lambda data: None


# -- geventwebsocket --


@functools.cache
def _gws_classes() -> tuple[type, type]:
    """gevent-websocket's WebSocket and handler with chaussette's mending (built on first
    use: the module must import without gevent-websocket, for the ws4py backend)."""
    from geventwebsocket.exceptions import WebSocketError
    from geventwebsocket.handler import WebSocketHandler
    from geventwebsocket.websocket import WebSocket

    data_opcodes = (WebSocket.OPCODE_CONTINUATION, WebSocket.OPCODE_TEXT, WebSocket.OPCODE_BINARY)

    class MendedWebSocket(WebSocket):  # type: ignore[misc]
        """gevent-websocket's WebSocket whose close frames carry their status code."""

        closed: bool  # gevent-websocket's: the connection is done with
        close_sent = False  # a close frame went out: no data frame may follow

        def send_frame(self, message: Any, opcode: int) -> None:
            if self.close_sent and opcode in data_opcodes:
                raise WebSocketError("the closing handshake has begun")
            super().send_frame(message, opcode)

        def _send_close(self, code: int | None, reason: bytes | str | None) -> None:
            self.close_sent = True
            try:
                self.send_frame(close_payload(code, reason), self.OPCODE_CLOSE)
            except (OSError, AttributeError):  # WebSocketError is an OSError; gone
                ws_log.debug("could not send a close frame")

        def close(self, code: int | None = 1000, message: bytes | str | None = b"") -> None:
            """Send a close frame with ``code`` (unless one went out already), then stop
            using the connection. Also the reply to the client's close frame, which
            gevent-websocket makes with the client's code."""
            if not self.closed and not self.close_sent:
                self._send_close(code, message)
            self.closed = True
            for name in ("stream", "raw_write", "raw_read", "environ"):
                setattr(self, name, None)  # as gevent-websocket does: nothing more to do

        def going_away(self) -> None:
            """Start the closing handshake (1001) and keep reading: ``receive()`` then
            returns None when the client answers."""
            if not self.closed and not self.close_sent:
                self._send_close(GOING_AWAY, _SHUTDOWN_REASON)

    class DiscardedWebSocket(WebSocket):  # type: ignore[misc]
        """The WebSocket gevent-websocket made, replaced by ours before any use: its
        ``__del__`` would send a close frame (and log that it could not)."""

        __slots__ = ()

        def __del__(self) -> None:
            return

    class GeventWebSocketHandler(HandlerMixin, WebSocketHandler):  # type: ignore[misc]
        """gevent-websocket's handler with chaussette's rules, our WebSocket, and our
        own run_websocket (no per-address registry)."""

        @property
        def logger(self) -> logging.Logger:
            return ws_log

        def upgrade_websocket(self) -> Any:
            result = super().upgrade_websocket()
            if result:  # a refusal, whose body gevent-websocket gives as str (a 2.x leftover)
                result = [
                    part.encode("latin-1", "replace") if isinstance(part, str) else part
                    for part in result
                ]
            return result

        def upgrade_connection(self) -> Any:
            result = super().upgrade_connection()
            old = getattr(self, "websocket", None)
            if old is not None and not isinstance(old, MendedWebSocket):
                mended: Any = MendedWebSocket(self.environ, old.stream, self)
                old.__class__ = DiscardedWebSocket
                self.websocket = self.environ["wsgi.websocket"] = mended
            return result

        def run_websocket(self) -> None:
            ws = self.websocket
            adapter = self.server.chaussette
            try:
                with adapter.session(ws, self.socket):
                    result = self.application(self.environ, _no_start_response)
                    try:
                        for _ in result or ():
                            pass  # whatever an app yields after a 101 has nowhere to go
                    finally:
                        close = getattr(result, "close", None)
                        if close is not None:
                            close()
            except Exception:
                if not ws.closed:
                    ws.close(INTERNAL_ERROR, "internal error")
                raise
            finally:
                if not ws.closed:
                    ws.close(1000, b"")
                self.environ["wsgi.websocket"] = None
                self.websocket = None

    return MendedWebSocket, GeventWebSocketHandler


class GeventWebSocketServer(WebSocketServer):
    """gevent's pywsgi with gevent-websocket: ``environ['wsgi.websocket']``."""

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        super().__init__(app, listener, settings)
        self.handler_class = _gws_classes()[1]

    def going_away(self, ws: Any) -> None:
        ws.going_away()


# -- geventws4py --


@functools.cache
def _ws4py_handler() -> type:
    from gevent.pywsgi import WSGIHandler
    from ws4py.exc import HandshakeError

    class WS4PyHandler(HandlerMixin, WSGIHandler):  # type: ignore[misc]
        """pywsgi's handler that hands an upgraded connection to ws4py, as ws4py's own
        gevent handler does, but runs the websocket in this greenlet (the pool counts it)
        and tracks it for a drain."""

        def run_application(self) -> None:
            if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
                super().run_application()
                return
            self.environ["ws4py.socket"] = self.socket
            try:
                super().run_application()
            except HandshakeError as exc:
                if self.headers_sent:
                    raise
                self._refuse(exc)
                return
            finally:
                self.environ.pop("ws4py.socket", None)
            ws = self.environ.pop("ws4py.websocket", None)
            if ws is None:
                return  # the app answered in plain HTTP
            self.close_connection = True
            _close_on_error(ws)
            with self.server.chaussette.session(ws, self.socket):
                ws.run()  # until the closing handshake ends; ws4py closes the socket

        def finalize_headers(self) -> None:
            if self.code == 101:  # no Content-Length on a 1xx (RFC 9110 8.6)
                self.provided_content_length = False
            super().finalize_headers()

        def _refuse(self, exc: Exception) -> None:
            ws_log.info("websocket handshake refused: %s", exc)
            body = f"websocket handshake refused: {exc}\n".encode()
            self.close_connection = True
            self.start_response(
                "400 Bad Request",
                [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
            )
            self.write(body)

    return WS4PyHandler


def _close_on_error(ws: Any) -> None:
    """An exception from the app's ``received_message`` ends ws4py's loop, which then
    drops the connection without a close frame (peers see 1006): send 1011 first."""
    received = ws.received_message

    def received_message(message: Any) -> None:
        try:
            received(message)
        except Exception:
            ws.close(INTERNAL_ERROR, "internal error")
            raise

    ws.received_message = received_message


class GeventWS4PyServer(WebSocketServer):
    """gevent's pywsgi with ws4py: ``environ['ws4py.websocket']``."""

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        super().__init__(app, listener, settings)
        self.handler_class = _ws4py_handler()

    def going_away(self, ws: Any) -> None:
        ws.close(GOING_AWAY, _SHUTDOWN_REASON)  # its run() reads on until the answer


# -- socketio --


def _prefer_gevent() -> None:
    """Make ``'gevent'`` the first async mode engineio tries for a server created without
    one. engineio tries eventlet first: installed beside gevent, it would be chosen and
    could not serve here. An explicit async_mode is left alone (and refused later)."""
    import engineio

    cls = engineio.Server
    if getattr(cls.async_modes, "_chaussette", False):
        return
    original = cls.async_modes

    def async_modes(self: Any) -> list[str]:
        modes: list[str] = original(self)
        return ["gevent", *(m for m in modes if m != "gevent")]

    async_modes._chaussette = True  # type: ignore[attr-defined]
    cls.async_modes = async_modes


def engineio_servers(app: Any) -> list[Any]:
    """The engineio servers inside ``app``: a ``socketio.WSGIApp`` / ``engineio.WSGIApp``,
    or an app holding one as ``wsgi_app`` (Flask-SocketIO), a few wrappers deep."""
    found: list[Any] = []
    todo: list[Any] = [app]
    seen: set[int] = set()
    while todo and len(seen) < 16:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        inner = getattr(obj, "engineio_app", None)
        if inner is not None:
            eio = getattr(inner, "eio", inner)  # a socketio.Server holds its engineio one
            if hasattr(eio, "async_mode") and eio not in found:
                found.append(eio)
        todo.extend(getattr(obj, attr, None) for attr in ("wsgi_app", "app", "application"))
    return found


class SocketIOServer(GeventWebSocketServer):
    """python-socketio in gevent mode on pywsgi + gevent-websocket."""

    @classmethod
    def prepare(cls, settings: Settings) -> None:
        super().prepare(settings)
        _prefer_gevent()

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        super().__init__(app, listener, settings)
        self.engineio = engineio_servers(app)
        for eio in self.engineio:
            if eio.async_mode != "gevent":
                raise UsageError(
                    f"--backend socketio serves python-socketio on gevent, but the app's "
                    f"server has async_mode={eio.async_mode!r}: create it with "
                    "async_mode='gevent' or without async_mode"
                )

    def stop_accepting(self) -> None:
        super().stop_accepting()
        self._end_long_polls()

    def _end_long_polls(self) -> None:
        """Answer the long-polls in flight now (a NOOP packet), so that polling clients do
        not hold the drain until the next ping; their next poll finds the server gone and
        they reconnect."""
        try:
            from engineio import packet
        except ImportError:
            return
        for eio in self.engineio:
            for client in list(getattr(eio, "sockets", {}).values()):
                try:
                    if not (client.upgraded or client.closed or client.closing):
                        client.send(packet.Packet(packet.NOOP))
                except Exception:
                    log.exception("could not end a socket.io long-poll for the drain")
