"""The ``meinheld`` backend: meinheld's C HTTP server and its greenlets, in chaussette's build.

The meinheld on PyPI is broken on greenlet 3 (a slow reader stalls every client and corrupts
bodies); ``python -m chaussette.backends.meinheld_build`` builds it right. Any other meinheld
is refused before the app is imported.

- meinheld serves a duplicate of the listening socket, TCP or unix: it closes the sockets it
  serves when its loop ends, and ours must outlive it (the lifecycle closes it, or hands it to
  a re-exec). On a stop the duplicate is dropped, so that a socket we own stops accepting when
  the lifecycle closes it.
- Its loop runs in a thread. meinheld installs its own SIGINT/SIGTERM handlers when the loop
  starts; ``start`` puts ours back before any of those signals can be delivered (they stay
  blocked until then, and in that thread for good).
- Every meinheld call is made in that thread, from a greenlet in its loop that a pipe wakes:
  meinheld's C code calls into Python in the middle of its own work, so another thread
  holding the GIL is no guarantee.
- Drain: meinheld stops accepting and its loop ends when the last connection is closed.
  Idle keep-alive connections are shut down at once (from the main thread: a socket
  shutdown, that works even while a plain WSGI app blocks meinheld's loop), and a connection
  whose response ends while draining is shut down after it: neither holds the drain.
  meinheld ends a drain on its own after about two minutes (the longest timer it has).
- Its access log is off (it costs ~3x throughput); ``--access-log`` routes it to
  ``chaussette.access``. Errors (an app raising) go to the ``chaussette`` logger.
- meinheld sets TCP_NODELAY on accepted sockets and writes the head with the first piece
  of the body.
- environ: SERVER_NAME and SERVER_PORT are the listening socket's (meinheld would say
  127.0.0.1:8000); on a unix socket REMOTE_ADDR is the socket path, as with wsgiref.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType, TracebackType
from typing import Any

from chaussette.backends import meinheld_build
from chaussette.backends.base import Server, pending_bytes
from chaussette.errors import EXIT_RUNTIME, ChaussetteError, UsageError

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

# meinheld's timers are whole seconds and capped at ~127 s: the stop it is given ends the
# loop after that much time, whatever is left.
_LONGEST_STOP = 120
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)

_server: ModuleType | None = None  # meinheld.server, once prepare() has checked the build


def _load() -> ModuleType:
    problem = meinheld_build.build_problem()
    if problem is not None:
        raise UsageError(f"backend 'meinheld': {problem}")
    import meinheld.server  # after the check: the PyPI build must not even load

    server: ModuleType = meinheld.server

    # meinheld's own logging module hangs stream handlers on two loggers; we replace both
    # of its hooks, and nothing of it may ever print.
    for name in ("meinheld.error", "meinheld.access"):
        logger = logging.getLogger(name)
        for handler in logger.handlers[:]:
            if getattr(handler, "_meinheld", False):
                logger.removeHandler(handler)
    return server


class _ErrorLog:
    """meinheld's error hook: ``error(type, value, traceback)``."""

    def error(self, exc: type[BaseException], val: BaseException, tb: TracebackType) -> None:
        if isinstance(val, (BrokenPipeError, ConnectionResetError)):
            log.debug("client went away: %s", val)
            return
        log.error("error serving a request", exc_info=(exc, val, tb))


class _AccessLog:
    """meinheld's access hook, called once a response is done, into ``chaussette.access``.

    The size is the body's: meinheld's own count takes in the head when it had to wait to
    send it."""

    def access(self, environ: dict[str, Any]) -> None:
        query = environ.get("QUERY_STRING")
        uri = environ.get("PATH_INFO", "") + (f"?{query}" if query else "")
        access.info(
            '%s - - [%s] "%s %s %s" %s %s "%s" "%s" %.3f',
            environ.get("REMOTE_ADDR") or "-",
            time.strftime("%d/%b/%Y:%H:%M:%S %z"),
            environ.get("REQUEST_METHOD", "-"),
            uri,
            environ.get("SERVER_PROTOCOL", "-"),
            environ.get("STATUS_CODE", "-"),
            environ.get("chaussette.body_bytes", environ.get("SEND_BYTES")) or "-",
            environ.get("HTTP_REFERER", "-"),
            environ.get("HTTP_USER_AGENT", "-"),
            environ.get("REQUEST_TIME", 0) / 1000,
        )


class _Response:
    """The app's response as meinheld sees it: iterated as is, and ``close()`` (which meinheld
    calls once the response is done, sent or cut) tells the server the request is over.
    With an access log, the body's bytes are counted on the way, for the log."""

    __slots__ = ("environ", "fd", "head", "result", "sent", "server")

    def __init__(
        self, server: MeinheldServer, result: Any, fd: int, head: bool, environ: Any
    ) -> None:
        self.server, self.result, self.fd, self.head = server, result, fd, head
        self.environ = environ
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.head:  # meinheld would send the body of a HEAD response
            return iter(())
        if self.environ is not None:
            return self._counted()
        return iter(self.result)

    def _counted(self) -> Iterator[bytes]:
        for data in self.result:
            self.sent += len(data)
            yield data

    def close(self) -> None:
        try:
            if self.environ is not None:
                self.environ["chaussette.body_bytes"] = self.sent
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.server._finished(self.fd)


class MeinheldServer(Server):
    @classmethod
    def prepare(cls, settings: Any) -> None:
        global _server
        if _server is None:
            _server = _load()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        global _server
        if _server is None:
            _server = _load()
        self.server = _server
        sock = self.listener.sock
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.local = sock.getsockname()
        self.unix_path: str | None = None
        if self.tcp:
            self.server_name, self.server_port = str(self.local[0]), str(self.local[1])
        else:
            self.unix_path = self.listener.unix_path() or ""
            self.server_name, self.server_port = self.unix_path, ""
        self.busy: dict[int, int] = {}  # connection fd -> requests in flight on it
        self.done: set[int] = set()  # connections that finished a request (maybe idle now)
        self.draining = False
        self.fd = -1  # meinheld's duplicate of the listening socket
        self.ready = threading.Event()
        self.wake_r, self.wake_w = os.pipe()
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.file_wrapper_type: type | None = None
        self.log_access = access.isEnabledFor(logging.INFO)

    # -- the WSGI app meinheld calls --

    def _wsgi(self) -> Any:
        """The app meinheld calls: the user's app, the environ fixed, each request tracked
        until meinheld closes its response. The common case (a list body) costs one call."""
        app, busy, finished, tcp = self.app, self.busy, self._finished, self.tcp
        server_name, server_port, unix_path = self.server_name, self.server_port, self.unix_path
        special = self._special

        class ListBody(list):  # type: ignore[type-arg]
            """A list body, still iterated by meinheld in C, whose close() ends the request."""

            __slots__ = ("fd",)
            fd: int

            def close(self) -> None:
                finished(self.fd)

        plain_lists = not self.log_access
        adapter = self

        def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
            fd = environ["meinheld.client"].get_fd()
            busy[fd] = busy.get(fd, 0) + 1
            environ["SERVER_NAME"] = server_name
            environ["SERVER_PORT"] = server_port
            if "QUERY_STRING" not in environ:  # meinheld leaves it out when empty
                environ["QUERY_STRING"] = ""
            if not tcp:
                environ["REMOTE_ADDR"] = unix_path
                environ.pop("REMOTE_PORT", None)
                host = environ.get("HTTP_HOST")
                if host:
                    environ["SERVER_NAME"] = host.rsplit(":", 1)[0] if "]" not in host else host
            try:
                result = app(environ, _Start(start_response, adapter))
            except BaseException:
                finished(fd)
                raise
            if type(result) is list and plain_lists and environ["REQUEST_METHOD"] != "HEAD":
                body = ListBody(result)
                body.fd = fd
                return body
            return special(environ, result, fd)

        return wsgi

    def _special(self, environ: dict[str, Any], result: Any, fd: int) -> Any:
        """Any body but a plain list: HEAD, meinheld's file wrapper, an access log."""
        if self.file_wrapper_type is None:
            self.file_wrapper_type = type(environ["wsgi.file_wrapper"](_NoFile()))
        head = environ["REQUEST_METHOD"] == "HEAD"
        if type(result) is self.file_wrapper_type and not head:
            # meinheld sends it with sendfile only as its own type: no hook on its end
            self._finished(fd)
            return result
        return _Response(self, result, fd, head, environ if self.log_access else None)

    def _finished(self, fd: int) -> None:
        left = self.busy.pop(fd, 1) - 1
        if left > 0:
            self.busy[fd] = left
        self.done.add(fd)
        if self.draining and not pending_bytes(fd):
            # its response is sent (or cut): no keep-alive while draining. A next request
            # already here is served instead (answered Connection: close), not cut.
            _shutdown(fd)

    # -- Server API --

    def start(self) -> None:
        self.fd = os.dup(self.listener.sock.fileno())
        os.set_inheritable(self.fd, False)
        self.server.set_access_logger(_AccessLog() if self.log_access else None)
        self.server.set_error_logger(_ErrorLog())
        # The loop's thread inherits these blocked: they reach the main thread only, after
        # our handlers are back in place of the ones meinheld installs.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self.thread = threading.Thread(
                target=self._run, name="chaussette-meinheld", daemon=True
            )
            self.thread.start()
            while not self.ready.wait(0.05):
                if not self.thread.is_alive():
                    raise ChaussetteError(f"meinheld did not start: {self.failure}")
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
                handler = signal.getsignal(signum)
                if handler is not None:
                    signal.signal(signum, handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def stop_accepting(self) -> None:
        if self.draining or self.thread is None or not self.thread.is_alive():
            return
        self.draining = True
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"s")  # the rest is done in meinheld's loop: _watch
        for fd in self.done - self.busy.keys():
            # idle ones only: one whose next request is already here is served, with
            # Connection: close, then shut by _finished
            if self._is_connection(fd) and not pending_bytes(fd):
                _shutdown(fd)

    def wait_idle(self, timeout: float) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                return False
        return not self.busy

    def in_flight(self) -> int:
        return sum(self.busy.values())

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- meinheld's thread --

    def _run(self) -> None:
        server = self.server
        try:
            server.set_keepalive(min(5, max(1, int(self.settings.timeout))))
            server.set_max_content_length(1 << 30)
            server.listen(socket_fd=[self.fd])
            server.spawn(self._watch)
            server.run(self._wsgi())
        except BaseException as exc:
            self.failure = exc
            if not self.ready.is_set():
                return
            log.exception("meinheld's loop failed")
        if not self.draining:
            self._died()

    def _watch(self) -> None:
        """A greenlet in meinheld's loop: says the loop runs, then waits for the stop."""
        self.ready.set()
        try:
            self.server.trampoline(self.wake_r, read=True)
            if os.read(self.wake_r, 64):  # b"": the pipe was closed, the process is ending
                self._stop_accepting_in_loop()
        except Exception:
            log.exception("stopping meinheld")

    def _stop_accepting_in_loop(self) -> None:
        server = self.server
        server.set_keepalive(0)  # requests from now on are answered "Connection: close"
        server.stop(_LONGEST_STOP)  # stops accepting; the loop ends with the last connection
        # meinheld's hold on the listening socket goes; /dev/null keeps the number taken until
        # meinheld closes it, when its loop ends.
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.dup2(null, self.fd, inheritable=False)
        finally:
            os.close(null)

    def _is_connection(self, fd: int) -> bool:
        """Is ``fd`` still a connection meinheld accepted (and not, since its number was
        reused, a socket or file of the app's)?"""
        sock = _socket_of(fd)
        if sock is None:
            return False
        with sock:
            try:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    return False
                name = sock.getsockname()
            except OSError:
                return False
        if self.tcp:
            return sock.family == self.listener.family and name[1] == self.local[1]
        return sock.family == socket.AF_UNIX and name == self.local

    def _died(self) -> None:
        """meinheld's loop ended on its own: nothing serves any more, so the process ends."""
        log.critical(
            "meinheld stopped serving on its own%s; exiting (exit %d)",
            f" ({self.failure})" if self.failure else "",
            EXIT_RUNTIME,
        )
        with contextlib.suppress(OSError):
            self.listener.close()
        logging.shutdown()
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os._exit(EXIT_RUNTIME)


def _socket_of(fd: int) -> socket.socket | None:
    """A socket object on a duplicate of ``fd`` (closing it leaves ``fd`` alone), or None
    when ``fd`` is closed or not a socket."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None


def _shutdown(fd: int) -> None:
    """End a connection by its fd without closing the fd (meinheld owns it): what was queued
    is still sent, then FIN; meinheld then reads the end and closes it."""
    sock = _socket_of(fd)
    if sock is not None:
        with sock, contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _NoFile:
    """Only to learn the type of meinheld's file wrapper."""

    def read(self, size: int = -1) -> bytes:
        return b""


class _Start:
    """``start_response`` adding ``Connection: close`` when the response starts during a
    drain (the app may have been called before it). meinheld decides keep-alive when it
    reads the request and appends its own ``Connection`` header after the app's: with
    ``close`` among the values, clients close; meinheld shuts the connection after a
    response that ends during a drain anyway."""

    __slots__ = ("adapter", "start_response")

    def __init__(self, start_response: Any, adapter: Any) -> None:
        self.start_response = start_response
        self.adapter = adapter

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if self.adapter.draining:
            headers = [*headers, ("Connection", "close")]
        return self.start_response(status, headers, exc_info)
