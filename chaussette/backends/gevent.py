"""The ``gevent`` and ``fastgevent`` backends: one greenlet per connection on gevent's hub.

What both keep (``GreenServer``):

- ``prepare`` monkey-patches the standard library (``gevent.monkey.patch_all``) before the
  app is imported, unless ``--no-monkey``;
- connections are served from a ``gevent.pool.Pool`` of ``--spawn`` greenlets (default
  1000); when it is full gevent stops accepting and new connections wait in the listen
  queue. The pool is also what a drain waits on;
- the listener is adopted, never rebound: gevent gets a duplicate of its fd as a gevent
  socket, which makes the shared file non-blocking (a blocking listener hangs the whole hub
  when another process sharing it takes the connection first). Closing the duplicate is how
  gevent stops accepting; the original stays for the lifecycle (and a re-exec);
- TCP_NODELAY on accepted TCP connections; ``--timeout`` bounds every wait for the client
  (each one, not a whole transfer: a slow but steady download is not cut);
- the main thread waits for signals inside the hub (``gevent.select``), so serving goes on
  while it waits, with or without monkey-patching; ``wait_idle`` waits in the hub too;
- a drain: stop accepting; a connection waiting for its next request after serving one
  (an idle keep-alive connection) is closed at once, one accepted but still silent gets
  ``FRESH_GRACE`` seconds to send its first request; requests being served finish and their
  connection closes after the response (``Connection: close``);
- what gevent's hub would print on stderr (a crashed greenlet, an accept error) goes to the
  ``chaussette`` logger.

``gevent`` is gevent's own ``pywsgi.WSGIServer`` with chaussette's ``HandlerMixin`` mixed
into its handler: the rules above, no body after HEAD (pywsgi sends one), a
``wsgi.file_wrapper`` (pywsgi has none), REMOTE_ADDR on unix sockets, app errors and bad
requests in our log, its access log in ``chaussette.access`` only with --access-log.
Subclasses (the websocket backends) change ``handler_class`` (mix ``HandlerMixin`` in first),
``server_class``, ``wrap_app`` and ``server_kwargs``.

``fastgevent`` is gevent's bare ``StreamServer`` with chaussette's own HTTP/1.1: the request
head parser, response framing and environ of the wsgiref backend and the strict WSGI host of
chaussette/wsgi.py, with keep-alive and ``sendfile`` for ``wsgi.file_wrapper``.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO
from wsgiref.util import FileWrapper

import gevent
import gevent.pool
import gevent.pywsgi
import gevent.select
import gevent.server
import gevent.socket

from chaussette.backends.base import FRESH_GRACE, Server, pending_bytes
from chaussette.backends.wsgiref import (
    HTTP1,
    BadRequest,
    HTTPSink,
    read_head,
    wants_keep_alive,
)
from chaussette.wsgi import ErrorStream, Response

if TYPE_CHECKING:
    from chaussette.settings import Settings
    from chaussette.sockets import Listener
    from chaussette.wsgi import WSGIApp

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

DEFAULT_SPAWN = 1000  # greenlets (connections) at once when --spawn is not given
_SWEEP = 0.1  # seconds between two looks at waiting connections while draining
_SENDFILE_BLOCK = 1 << 20
_SMALL_WRITE = 65536  # a first body piece up to this size goes out with the head


class Connections:
    """The connections waiting for a request, so that a drain can close the idle ones.

    A connection is waiting from the end of a response (or its accept) until the first byte
    of its next request arrives; a request being read or served is never cut by a drain.
    """

    def __init__(self) -> None:
        self.waiting: dict[Any, bool] = {}  # socket -> it has served a request already
        self.draining = False
        self.drain_started = 0.0

    def wait_for_request(self, sock: Any, rfile: Any, served: bool) -> bool:
        """Wait (in the hub) for the first byte of the next request. False when the
        connection should close instead: the client closed or stayed silent for --timeout,
        or a drain closed it."""
        if served and self.draining:
            return False
        self.waiting[sock] = served
        try:
            return bool(rfile.peek(1))  # returns at once when a request is buffered
        except (OSError, ValueError):  # timed out, reset, shut down by a drain; closed
            return False
        finally:
            self.waiting.pop(sock, None)

    def start_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    def sweep(self) -> None:
        """Close the connections a drain need not wait for: idle keep-alive ones at once,
        silent new ones after FRESH_GRACE. Not one with request bytes already here."""
        fresh_expired = time.monotonic() - self.drain_started >= FRESH_GRACE
        for sock, served in list(self.waiting.items()):
            if (served or fresh_expired) and not pending_bytes(sock):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes its greenlet: it closes
                except OSError:
                    pass


class _LogStream:
    """A write-only stream into a logger: one record per line."""

    def __init__(self, logger: logging.Logger, level: int, prefix: str = "") -> None:
        self.logger = logger
        self.level = level
        self.prefix = prefix

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.logger.log(self.level, "%s%s", self.prefix, line.strip())
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        return


def _route_hub_errors(hub: Any) -> None:
    """What the hub would print on stderr (a greenlet that crashed, an accept that failed)
    goes to our log, with its traceback, as one record."""

    def print_exception(context: Any, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            return
        if isinstance(value, gevent.GreenletExit):
            return
        where = "" if context is None else f" in {context!r:.200}"
        log.error("unexpected error%s", where, exc_info=(kind, value, tb))

    hub.print_exception = print_exception


class GreenServer(Server):
    """What the gevent backends share: monkey-patching, the pool, the adopted listener,
    the cooperative waits and the drain. A subclass builds the gevent server
    (``make_server``) and serves connections with ``setup_connection`` and
    ``connections.wait_for_request``."""

    @classmethod
    def prepare(cls, settings: Settings) -> None:
        if settings.no_monkey:
            return
        from gevent import monkey

        monkey.patch_all()

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        super().__init__(app, listener, settings)
        self.pool = gevent.pool.Pool(settings.spawn or DEFAULT_SPAWN)
        self.connections = Connections()
        self.timeout: float | None = settings.timeout or None
        self.tcp = listener.sock.family in (socket.AF_INET, socket.AF_INET6)
        self.unix_path = "" if self.tcp else listener.unix_path() or ""
        self.log_access = access.isEnabledFor(logging.INFO)
        self.gserver: gevent.server.StreamServer | None = None

    def make_server(self, sock: gevent.socket.socket) -> gevent.server.StreamServer:
        """The gevent server on ``sock`` (a gevent socket), spawning into ``self.pool``."""
        raise NotImplementedError

    def setup_connection(self, sock: Any) -> None:
        """Called first on every accepted connection."""
        try:
            if self.tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout)
        except OSError:
            pass  # already reset: the first read says so

    # -- Server API --

    def start(self) -> None:
        _route_hub_errors(gevent.get_hub())
        sock = gevent.socket.socket(fileno=os.dup(self.listener.sock.fileno()))
        try:
            self.gserver = self.make_server(sock)
            self.gserver.start()
        except BaseException:
            sock.close()
            raise

    def stop_accepting(self) -> None:
        self.connections.start_drain()
        if self.gserver is not None and not self.gserver.closed:
            self.gserver.close()  # closes our duplicate only

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.connections.draining:
                self.connections.sweep()
            left = deadline - time.monotonic()
            if self.pool.join(timeout=max(0.0, min(left, _SWEEP))):
                return True
            if left <= 0:
                return False

    def in_flight(self) -> int:
        return max(0, len(self.pool) - len(self.connections.waiting))

    def wait_readable(self, fd: int, timeout: float | None) -> None:
        gevent.select.select([fd], [], [], timeout)

    def close(self) -> None:
        if self.gserver is not None and not self.gserver.closed:
            self.gserver.close()


# -- gevent: pywsgi --


def _send_all(sock: Any, data: bytes | bytearray) -> None:
    """``sendall`` whose timeout bounds each wait, not the whole transfer."""
    with memoryview(data) as view:
        sent, size = 0, len(view)
        while sent < size:
            sent += sock.send(view[sent:])


class HandlerMixin:
    """What chaussette adds to a ``pywsgi.WSGIHandler`` (or a subclass of it, such as
    gevent-websocket's): mix it in first, ``class H(HandlerMixin, WebSocketHandler)``.
    The server must carry the adapter as ``server.chaussette``."""

    # set by pywsgi.WSGIHandler
    server: Any
    socket: Any
    rfile: Any
    environ: Any
    command: str | None
    code: int | None
    status: Any
    path: str | None
    headers_sent: bool
    close_connection: bool
    request_version: str | None
    response_headers: list[tuple[bytes, bytes]]
    response_use_chunked: bool
    response_length: int
    requestline: str | None
    client_address: Any
    time_start: float
    time_finish: float

    served = False  # this connection has had a request
    body_bytes = 0  # of the current response

    def handle(self) -> None:
        self.server.chaussette.setup_connection(self.socket)
        super().handle()  # type: ignore[misc]

    def handle_one_request(self) -> Any:
        adapter = self.server.chaussette
        if not adapter.connections.wait_for_request(self.socket, self.rfile, self.served):
            return None
        self.served = True
        self.body_bytes = 0
        self.environ = None
        return super().handle_one_request()  # type: ignore[misc]

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()  # type: ignore[misc]
        env["wsgi.errors"] = ErrorStream()
        env["RAW_URI"] = env["REQUEST_URI"] = self.path
        adapter = self.server.chaussette
        if not adapter.tcp:
            env["REMOTE_ADDR"] = adapter.unix_path
            host = env.get("HTTP_HOST")
            if host:
                env["SERVER_NAME"] = host.rsplit(":", 1)[0] if "]" not in host else host
        return env

    def finalize_headers(self) -> None:
        super().finalize_headers()  # type: ignore[misc]
        if self.command == "HEAD":
            self.response_use_chunked = False  # no body, so no last chunk either
        elif (
            self.request_version == "HTTP/1.0"
            and not self.close_connection
            and self.code not in (204, 304)
            and not any(name.lower() == b"content-length" for name, _ in self.response_headers)
        ):
            # pywsgi keeps an HTTP/1.0 connection alive after a body only its end can frame
            self.close_connection = True
            self.response_headers = [
                (name, value)
                for name, value in self.response_headers
                if name.lower() != b"connection"
            ]
            self.response_headers.append((b"Connection", b"close"))
        if (
            self.server.chaussette.connections.draining
            and not self.close_connection
            and self.code != 101
            and self.request_version == "HTTP/1.1"
        ):
            self.response_headers.append((b"Connection", b"close"))
            self.close_connection = True

    def _write(self, data: bytes) -> None:
        if self.command == "HEAD" or not data:
            return
        self.body_bytes += len(data)
        super()._write(data)  # type: ignore[misc]

    def _write_with_headers(self, data: bytes) -> None:
        # pywsgi sends the head and the first body bytes in two writes: two syscalls and,
        # with TCP_NODELAY, two segments. A small first piece goes out with the head.
        if not data or len(data) > _SMALL_WRITE or self.command == "HEAD":
            super()._write_with_headers(data)  # type: ignore[misc]
            return
        self.headers_sent = True
        self.finalize_headers()
        out = bytearray(b"HTTP/1.1 ")
        out += self.status
        out += b"\r\n"
        for name, value in self.response_headers:
            out += b"%s: %s\r\n" % (name, value)
        out += b"\r\n"
        if self.response_use_chunked:
            out += b"%x\r\n%s\r\n" % (len(data), data)
        else:
            out += data
        self.body_bytes += len(data)
        self._sendall(out)

    def _sendall(self, data: bytes | bytearray) -> None:
        try:
            _send_all(self.socket, data)
        except OSError as exc:
            self.status = f"socket error: {exc}"  # as pywsgi does: tells handle_error
            if self.code and self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

    def log_request(self) -> None:
        if not self.server.chaussette.log_access:
            return
        duration = (self.time_finish or time.time()) - self.time_start
        if isinstance(self.status, str) or self.environ is None:  # refused before the app
            environ = {
                "REMOTE_ADDR": self.server.chaussette.unix_path
                if not isinstance(self.client_address, tuple)
                else str(self.client_address[0]),
                "RAW_URI": self.requestline or "",
            }
            code = int(str(self.status)[:3]) if str(self.status)[:3].isdigit() else 0
            HTTP1.access_line(environ, code, 0, duration)
            return
        HTTP1.access_line(self.environ, abs(self.code or 0), self.body_bytes, duration)

    def log_error(self, msg: str, *args: Any) -> None:
        # pywsgi's report of a malformed request, without the socket's repr it prepends
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):
            message = f"{msg!r} {args!r}"
        log.info("bad request: %s", message)

    def _handle_client_error(self, ex: Exception) -> Any:
        # pywsgi prints a traceback on stderr for a malformed request unless the error is a
        # ValueError; too many or too long headers are an http.client.HTTPException
        if not isinstance(ex, (ValueError, OSError, http.client.HTTPException)):
            log.error("unexpected error reading a request", exc_info=ex)
        if not isinstance(ex, ValueError):
            ex = ValueError(str(ex) or type(ex).__name__)
        return super()._handle_client_error(ex)  # type: ignore[misc]

    def _log_error(self, kind: Any, value: Any, tb: Any) -> None:
        if issubclass(kind, gevent.GreenletExit):
            return
        env = self.environ or {}
        where = (env.get("REQUEST_METHOD"), env.get("PATH_INFO"))
        if isinstance(self.status, str) and self.status.startswith("socket error"):
            log.info("client went away (%s %s): %s", *where, value)
        elif self.headers_sent:
            log.error(
                "app failed after the response started (%s %s): connection cut",
                *where,
                exc_info=(kind, value, tb),
            )
        else:
            log.error("app failed (%s %s): answered 500", *where, exc_info=(kind, value, tb))


class Handler(HandlerMixin, gevent.pywsgi.WSGIHandler):  # type: ignore[misc]
    """pywsgi's handler with chaussette's rules."""


class GeventServer(GreenServer):
    """gevent's pywsgi on the adopted listener."""

    #: the pywsgi handler class; a subclass mixes ``HandlerMixin`` in first
    handler_class: type = Handler
    #: the pywsgi server class
    server_class: type = gevent.pywsgi.WSGIServer

    def wrap_app(self, app: WSGIApp) -> WSGIApp:
        """The application the server calls (a subclass may wrap it)."""
        return app

    def server_kwargs(self) -> dict[str, Any]:
        """More keyword arguments for ``server_class``."""
        return {}

    def base_environ(self) -> dict[str, Any]:
        if self.tcp:
            host, port = self.listener.sock.getsockname()[:2]
            name, port_text = str(host), str(port)  # given: pywsgi would do a DNS lookup
        else:
            name, port_text = self.unix_path, ""
        return {"SERVER_NAME": name, "SERVER_PORT": port_text, "wsgi.file_wrapper": FileWrapper}

    def make_server(self, sock: gevent.socket.socket) -> gevent.server.StreamServer:
        kwargs: dict[str, Any] = {
            "spawn": self.pool,
            "log": None,  # HandlerMixin.log_request writes the access log
            "error_log": _LogStream(log, logging.INFO, "bad request: "),
            "handler_class": self.handler_class,
            "environ": self.base_environ(),
        }
        kwargs.update(self.server_kwargs())
        server: gevent.server.StreamServer = self.server_class(
            sock, self.wrap_app(self.app), **kwargs
        )
        server.chaussette = self  # read by HandlerMixin
        return server


# -- fastgevent: StreamServer + chaussette's HTTP/1.1 --


class GreenSink(HTTPSink):
    """HTTPSink on a gevent socket, with a cooperative ``sendfile``; a response that
    starts while a drain is on says ``Connection: close``."""

    connections: Connections

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.connections.draining:
            self.keep_alive = False  # the drain began while the app ran
        super().send_headers(status, headers, body)

    def send_file(self, file: BinaryIO, count: int | None) -> int | None:
        if self.chunked:
            return None
        if self.head_only:
            return 0
        try:
            in_fd = file.fileno()
            if not stat.S_ISREG(os.fstat(in_fd).st_mode):
                return None
        except (AttributeError, OSError, ValueError):
            return None
        out_fd = self.sock.fileno()
        start = file.tell()  # PEP 3333: from where the app left the file
        sent = 0
        while count is None or sent < count:
            block = _SENDFILE_BLOCK if count is None else min(_SENDFILE_BLOCK, count - sent)
            try:
                n = os.sendfile(out_fd, in_fd, start + sent, block)
            except BlockingIOError:
                gevent.socket.wait_write(
                    out_fd,
                    timeout=self.sock.gettimeout(),
                    timeout_exc=TimeoutError(errno.ETIMEDOUT, "timed out sending a file"),
                )
                continue
            if n == 0:
                break  # the end of the file
            sent += n
        file.seek(start + sent)
        return sent


class FastGeventServer(GreenServer):
    """gevent's StreamServer with chaussette's own HTTP/1.1 handling."""

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        super().__init__(app, listener, settings)
        self.http = HTTP1(listener, settings, multithread=False)

    def make_server(self, sock: gevent.socket.socket) -> gevent.server.StreamServer:
        return gevent.server.StreamServer(sock, self._serve, spawn=self.pool)

    def _serve(self, conn: Any, addr: Any) -> None:
        """One connection: requests until the client or the server ends it. The
        StreamServer closes ``conn`` afterwards."""
        self.setup_connection(conn)
        rfile = conn.makefile("rb", buffering=65536)
        wait_for_request: Callable[[Any, Any, bool], bool] = self.connections.wait_for_request
        try:
            served = False
            while wait_for_request(conn, rfile, served):
                served = True
                if not self._one_request(conn, rfile, addr):
                    break
        except Exception:
            log.exception("unexpected error serving a connection")
        finally:
            rfile.close()

    def _one_request(self, conn: Any, rfile: Any, addr: Any) -> bool:
        """Serve one request; True when the connection may carry another."""
        http = self.http
        started = time.monotonic()
        try:
            request = read_head(rfile, http.max_line, http.max_headers)
        except BadRequest as exc:
            log.info("bad request from %s: %s", http.client(addr), exc)
            http.reject(conn, exc.status)
            return False
        except OSError:  # timed out, reset, shut down by a drain
            return False
        if request is None:
            return False
        environ, source = http.environ(request, rfile, conn, addr)
        if environ is None:
            return False
        keep_alive = not self.connections.draining and wants_keep_alive(environ)
        sink = GreenSink(conn, request.version, request.method == "HEAD", keep_alive)
        sink.connections = self.connections
        response = Response(self.app, environ, sink)
        response.run()
        if http.log_access:
            http.access_line(
                environ, response.status_code, response.body_bytes, time.monotonic() - started
            )
        if not source.done:  # the app left part of the body unread
            http.linger(conn)
            return False
        return sink.reusable and not response.client_gone
