"""The ``eventlet`` backend: eventlet's WSGI server on a green pool.

Requests are parsed and answered by ``eventlet.wsgi`` (its ``Server`` and ``HttpProtocol``);
the accept loop is ours, because ``eventlet.wsgi.server()`` cannot stop cleanly: it loops
on a module-wide flag, closes the socket it was given, and keys its connections by client
address, which is the same empty string for every unix socket client. Here:

- ``prepare`` monkey-patches the standard library (``eventlet.monkey_patch()``) before the
  app is imported, unless --no-monkey;
- the adopted listener is served through a green duplicate of its descriptor; a green
  thread accepts, at most --spawn connections are served at once (a ``GreenPool``, 1024 by
  default as in eventlet) and at the bound new connections wait in the listen queue;
- stopping: the accept loop ends, idle keep-alive connections are shut at once, responses
  not started yet say ``Connection: close``, and requests in flight finish;
- the main thread waits for signals in eventlet's hub (a green select), so the server
  keeps running while it waits, with or without monkey-patching;
- eventlet's environ is kept, with ``SERVER_PROTOCOL`` set to the request's version (eventlet
  always says HTTP/1.0), ``QUERY_STRING`` always there, its ``headers_raw`` (not a CGI
  variable) moved to ``eventlet.headers_raw``, no ``CONTENT_TYPE`` invented when the client
  sent none,
  ``wsgi.file_wrapper``, ``wsgi.errors`` to the ``chaussette.app`` logger and, on a unix
  socket, the socket path as ``REMOTE_ADDR``;
- HEAD responses carry no body (eventlet would send what the app returns), and each piece
  of a streamed body is sent when the app yields it (eventlet gathers 4 KiB by default);
- TCP_NODELAY on accepted TCP connections: eventlet sends the head and a body larger than
  its 16 KiB buffer, or each piece of a streamed body, as separate writes;
- --timeout: a connection whose client stays silent that long while the server waits to
  read from it or write to it is closed. Not with eventlet's socket timeout, which arms a
  hub timer for every read and write that has to wait (about 5% of a small request's
  cost): a reaper green thread looks at the waiting connections once a second (a quarter
  of the timeout if that is shorter) and, when one has waited on the same read or write
  since ``timeout`` ago, raises in it the TimeoutError eventlet's timeout would have. So
  a silent client is cut after between ``timeout`` and ``timeout`` plus one look;
- app errors are logged with their traceback; clients get an empty 500. The access log
  goes to ``chaussette.access``, and is only built when --access-log is on.

eventlet 0.41 warns at import that it is deprecated (in bugfix mode); that one warning is
filtered, here only, so that it does not reach the terminal of every start.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
import warnings
from typing import Any
from wsgiref.util import FileWrapper

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated", category=Warning)
    import eventlet
    import eventlet.greenio
    import eventlet.hubs
    import eventlet.wsgi
    from eventlet.green import select as green_select

from chaussette.backends.base import FRESH_GRACE, Server, pending_bytes
from chaussette.wsgi import ErrorStream

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

DEFAULT_POOL = eventlet.wsgi.DEFAULT_MAX_SIMULTANEOUS_REQUESTS
ACCESS_FORMAT = (
    '%(client_ip)s - - [%(date_time)s] "%(request_line)s" %(status_code)s %(body_length)s '
    "%(wall_seconds).3f"
)
_CLIENT_GONE = ("BrokenPipeError", "ConnectionResetError", "ConnectionAbortedError", "TimeoutError")
_RETRY_ACCEPT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
REAP_EVERY = 1.0  # seconds between two looks for silent connections (at most)
SWEEP = 0.1  # seconds between two looks at waiting connections while draining


class _LibraryLog:
    """What eventlet.wsgi logs, sorted out: it sends app tracebacks and access lines alike
    to ``info``, already formatted."""

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        if not msg.startswith("Traceback"):
            access.info("%s", msg)
            return
        last = msg.rstrip().rsplit("\n", 1)[-1]
        if last.startswith(_CLIENT_GONE):  # a write to a client that went away
            log.info("client gone mid-response: %s", last)
        else:
            log.error("error in the application:\n%s", msg.rstrip())

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        log.error("%s", msg)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        log.debug("%s", msg)

    def write(self, msg: str, *args: Any) -> None:
        log.info("%s", msg.rstrip())


def _head_only(app: Any) -> Any:
    """The app for a HEAD request: its status and headers, none of its body."""

    def head(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            start_response(status, headers, exc_info)
            return _discard

        result = app(environ, start)
        try:
            for _ in result:  # a generator may call start_response late
                break
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return []

    return head


def _discard(data: bytes) -> None:
    return


def _expire(hub: Any, listener: Any) -> None:
    """From the hub: time out a wait that is still the same (it may have ended since)."""
    if not listener.spent and hub.listeners[listener.evtype].get(listener.fileno) is listener:
        listener.tb(TimeoutError("timed out"))


# called directly, not through super(): these run for every request
_base_get_environ = eventlet.wsgi.HttpProtocol.get_environ
_base_handle_one_response = eventlet.wsgi.HttpProtocol.handle_one_response


class _Protocol(eventlet.wsgi.HttpProtocol):  # type: ignore[misc]
    server: _WSGIServer
    application: Any

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = _base_get_environ(self)
        env["SERVER_PROTOCOL"] = self.request_version
        if "QUERY_STRING" not in env:
            env["QUERY_STRING"] = ""
        # PEP 3333: a key without a dot is a CGI variable, a str
        env["eventlet.headers_raw"] = raw = env.pop("headers_raw")
        for name, _ in raw:  # (a scan of the few raw names costs less than headers.get)
            if len(name) == 12 and name.lower() == "content-type":
                break
        else:
            env.pop("CONTENT_TYPE", None)  # eventlet says text/plain when none was sent
        env["wsgi.errors"] = ErrorStream()
        env["wsgi.file_wrapper"] = FileWrapper
        unix_path = self.server.unix_path
        if unix_path is not None:
            env["REMOTE_ADDR"] = unix_path
            env.pop("REMOTE_PORT", None)
            host = env.get("HTTP_HOST")
            if host:  # the name the client used, as the wsgiref backend does
                env["SERVER_NAME"] = host if "]" in host else host.rsplit(":", 1)[0]
            else:
                env["SERVER_NAME"] = unix_path
        return env

    def _read_request_line(self) -> Any:
        line = super()._read_request_line()
        self.server.fresh.discard(self.connection)  # no longer a silent new connection
        return line

    def handle_one_response(self) -> None:
        if self.command == "HEAD":
            self.application = _head_only(self.application)
        _base_handle_one_response(self)


class _WSGIServer(eventlet.wsgi.Server):  # type: ignore[misc]
    unix_path: str | None = None
    fresh: set[Any]  # connections accepted whose first request line is not read yet


class EventletServer(Server):
    @classmethod
    def prepare(cls, settings: Any) -> None:
        if not settings.no_monkey:
            eventlet.monkey_patch()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        s = self.settings
        sock = self.listener.sock
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        # A duplicate descriptor: eventlet makes it non-blocking and may close it; our
        # listener stays what the lifecycle expects.
        raw = eventlet.patcher.original("socket").socket(fileno=os.dup(sock.fileno()))
        self.green = eventlet.greenio.GreenSocket(raw)
        self.pool = eventlet.GreenPool(s.spawn or DEFAULT_POOL)
        # header limits are module settings in eventlet.wsgi (one server per process here)
        eventlet.wsgi.MAX_TOTAL_HEADER_SIZE = s.limit_request_headers
        eventlet.wsgi.MAX_HEADER_LINE = min(s.limit_request_headers, 65536)
        self.server = _WSGIServer(
            self.green,
            self.green.getsockname(),
            self.app,
            log=_LibraryLog(),
            protocol=_Protocol,
            minimum_chunk_size=0,  # PEP 3333: each piece the app yields goes out at once
            log_x_forwarded_for=False,
            keepalive=True,
            log_output=True,  # makes eventlet keep our logger: app tracebacks go through it
            log_format=ACCESS_FORMAT,
            # eventlet reads the line with its CRLF and refuses one as long as its limit
            url_length_limit=s.limit_request_line + 3,
            debug=False,  # never send a traceback to the client
            socket_timeout=None,  # --timeout is the reaper's (see the module docstring)
        )
        self.server.log_output = access.isEnabledFor(logging.INFO)  # the access line only
        if not self.tcp:
            self.server.unix_path = self.listener.unix_path() or ""
        self.connections: dict[Any, list[Any]] = {}
        self.server.fresh = set()
        self.drain_started = 0.0
        self.acceptor: Any = None
        self.reaper: Any = None

    # -- Server API --

    def start(self) -> None:
        self.acceptor = eventlet.spawn(self._accept_loop)
        if self.settings.timeout:
            self.reaper = eventlet.spawn(self._reap, float(self.settings.timeout))

    def stop_accepting(self) -> None:
        if self.acceptor is not None:
            self.acceptor.kill()
            self.acceptor = None
        self.green.close()
        self.server.keepalive = False  # responses not started yet say Connection: close
        self.drain_started = time.monotonic()
        for state in list(self.connections.values()):
            was = state[2]
            state[2] = eventlet.wsgi.STATE_CLOSE  # closed after the request in flight
            if was == eventlet.wsgi.STATE_IDLE:
                self._close_if_idle(state)

    def _close_if_idle(self, state: list[Any]) -> None:
        """In a drain, shut a connection waiting for a request unless a request is on its
        way: bytes received, or a new connection still within FRESH_GRACE."""
        conn = state[1]
        fresh = conn in self.server.fresh
        if fresh and time.monotonic() - self.drain_started < FRESH_GRACE:
            return
        if pending_bytes(conn):
            return
        eventlet.greenio.shutdown_safe(conn)  # wakes its read: it closes

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            for state in list(self.connections.values()):
                if state[1] in self.server.fresh:
                    self._close_if_idle(state)
            left = deadline - time.monotonic()
            with eventlet.Timeout(max(0.0, min(left, SWEEP)), False):
                self.pool.waitall()
            if self.pool.running() == 0:
                return True
            if left <= 0:
                return False

    def in_flight(self) -> int:
        count: int = self.server.outstanding_requests
        return count

    def wait_readable(self, fd: int, timeout: float | None) -> None:
        green_select.select([fd], [], [], timeout)

    def close(self) -> None:
        for thread in (self.acceptor, self.reaper):
            if thread is not None:
                thread.kill()
        self.acceptor = self.reaper = None
        self.green.close()

    # -- accepting and serving --

    def _accept_loop(self) -> None:
        while True:
            with self.pool.sem:  # a free slot first: at the bound, clients wait in the queue
                pass
            try:
                conn, addr = self.green.accept()
            except OSError as exc:
                if exc.errno in _RETRY_ACCEPT:
                    log.error("accept failed: %s; retrying in 0.1 s", exc.strerror)
                    eventlet.sleep(0.1)
                elif exc.errno not in (errno.EAGAIN, errno.ECONNABORTED):
                    log.error("accept failed: %s", exc)
                continue
            if self.tcp:
                try:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:  # already reset by the client
                    pass
            state = [addr, conn, eventlet.wsgi.STATE_IDLE]
            self.connections[conn] = state
            self.server.fresh.add(conn)
            self.pool.spawn_n(self._serve, state)

    def _reap(self, timeout: float) -> None:
        """Close the connections that have waited on one read or write for ``timeout``.

        A green thread waiting on a socket is registered in the hub with one listener
        object per wait; the same object seen at two looks ``timeout`` apart means no byte
        moved in between. Holding it here keeps its identity from being reused.
        """
        hub = eventlet.hubs.get_hub()
        buckets = (hub.listeners[hub.READ], hub.listeners[hub.WRITE])
        every = min(REAP_EVERY, timeout / 4)
        waits: dict[Any, tuple[Any, float]] = {}  # conn -> (its listener, when first seen)
        while True:
            eventlet.sleep(every)
            now = time.monotonic()
            seen: dict[Any, tuple[Any, float]] = {}
            for conn in list(self.connections):
                fd = conn.fileno()
                listener = buckets[0].get(fd) or buckets[1].get(fd)
                if listener is None:  # not waiting on its socket (in the app, or runnable)
                    continue
                before = waits.get(conn)
                if before is None or before[0] is not listener:
                    seen[conn] = (listener, now)
                elif now - before[1] >= timeout:
                    hub.schedule_call_global(0, _expire, hub, listener)
                else:
                    seen[conn] = before
            waits = seen

    def _serve(self, state: list[Any]) -> None:
        conn = state[1]
        try:
            self.server.process_request(state)
        except ConnectionError as exc:  # the client left while eventlet answered an error
            log.debug("connection lost: %s", exc)
        except Exception:
            log.exception("unexpected error serving a connection")
        finally:
            self.connections.pop(conn, None)
            self.server.fresh.discard(conn)
            state[2] = eventlet.wsgi.STATE_CLOSE
            eventlet.greenio.shutdown_safe(conn)
            conn.close()
