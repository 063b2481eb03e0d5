"""The ``bjoern`` backend: bjoern's C server (libev, http-parser), one request at a time.

What bjoern is, and how it is run here:

- ``bjoern.server_run(sock, app)`` runs a libev loop until that loop has nothing left to
  watch; it releases the GIL while it waits, so it runs in a background thread and the main
  thread keeps the lifecycle's signal handling. The app runs in that one thread: a slow app
  call delays every other client (a slow *reader* does not: writes are non-blocking).
- It is given a duplicate of the listening socket (its descriptor must outlive our closing
  of the listener while its loop may still look at it), made non-blocking, and, for TCP,
  with TCP_NODELAY, which the connections it accepts inherit (Linux).
- bjoern watches SIGINT with its own libev handler, which replaces Python's for the whole
  process: the handler the lifecycle installed is put back as soon as bjoern's loop starts.
- It has no stop call. The one way in is that SIGINT watcher, fed directly
  (``ev_feed_signal`` in libev): bjoern stops accepting, and its loop ends when its last
  connection closes. To get there, every connection gets ``shutdown(SHUT_RD)``: an idle
  keep-alive connection reads end-of-file and is closed when the loop is free; a response
  being computed or written is unaffected and its connection closes after it; a request
  still being *received* is cut. So SIGTERM lets in-flight responses finish, but idle
  connections only close once the app call in progress returns, no timeout bounds a
  silent client (bjoern has none), and bjoern's descriptor keeps the socket open until its
  loop ends, so a client connecting meanwhile waits (then is reset at exit) instead of being
  refused: the registry says ``drain=False``.
- When its SIGINT watcher stops, libev resets SIGINT to the default action, and when its
  loop ends bjoern raises a simulated SIGINT in Python. So from the stop until the loop has
  ended SIGINT is ignored (blocked in the main thread meanwhile, so that the default action
  is never taken); SIGQUIT still exits at once.
- bjoern sends a body with HEAD responses, leaves out an empty QUERY_STRING and has no
  access log: a thin wrapper around the app answers HEAD with headers only (the body is
  run and counted, as GET would send it, when the app gave no Content-Length) and, only
  with --access-log, logs each request.
  On a unix or IPv6 socket the same wrapper fixes the addresses bjoern gets wrong
  (it reads every peer as an IPv4 address).
- App errors reach Python's ``sys.excepthook`` from C; while bjoern serves, those raised on
  its thread are logged with their traceback instead of printed.

Known limits of bjoern 3.2 (not fixable from outside): a repeated request header is joined
without a separator ("a" and "b" give "ab"); the whole request body is read into memory
before the app is called; no timeouts; a client that disconnects mid-response makes it
print "Client N hit errno 32" on stderr.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import bjoern

from chaussette.backends.base import Server
from chaussette.errors import ChaussetteError

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

WSGIApp = Callable[..., Iterable[bytes]]
_SIG_DFL, _SIG_IGN = 0, 1
_POLL = 0.01  # seconds between two looks at bjoern's thread while stopping


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _c_handler(signum: int) -> int:
    """The address of the C handler the kernel runs for ``signum`` (0 default, 1 ignore).
    On Linux ``struct sigaction`` starts with the handler."""
    buf = ctypes.create_string_buffer(512)
    if _libc().sigaction(signum, None, buf) != 0:
        return -1
    return ctypes.c_void_p.from_buffer(buf).value or 0


def _feed_sigint() -> None:
    """Make bjoern's loop see a SIGINT without any signal being sent."""
    name = ctypes.util.find_library("ev") or "libev.so.4"
    ctypes.CDLL(name).ev_feed_signal(signal.SIGINT)


# -- the wrapper around the app --


def _head(app: WSGIApp, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A HEAD request: the app's status and headers, no body."""
    got: list[Any] = []

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        if exc_info is not None and got:
            raise exc_info[1].with_traceback(exc_info[2])
        got[:] = [status, headers]

    def has_length() -> bool:
        return bool(got) and any(k.lower() == "content-length" for k, _ in got[1])

    result = app(environ, start)
    size = 0
    try:
        if not has_length():
            # Without a length bjoern would chunk, and send the last chunk after the head:
            # count the body GET would send (start_response may come with its first piece).
            for piece in result:
                size += len(piece)
                if has_length():
                    break
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not got:
        raise RuntimeError("the application returned without calling start_response")
    status, headers = got
    if not has_length():
        headers = [*headers, ("Content-Length", str(size))]
    start_response(status, headers)
    return []


def _logged(app: WSGIApp) -> WSGIApp:
    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.monotonic()
        seen: list[Any] = ["-", None]

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen[0] = status.split(" ", 1)[0]
            seen[1] = next((v for k, v in headers if k.lower() == "content-length"), "-")
            return start_response(status, headers, exc_info)

        try:
            return app(environ, start)
        finally:
            query = environ.get("QUERY_STRING")
            access.info(
                '%s - - [%s] "%s %s%s %s" %s %s %.3f',
                environ.get("REMOTE_ADDR") or "-",
                time.strftime("%d/%b/%Y:%H:%M:%S %z"),
                environ.get("REQUEST_METHOD"),
                environ.get("PATH_INFO"),
                f"?{query}" if query else "",
                environ.get("SERVER_PROTOCOL"),
                seen[0],
                seen[1] or "-",
                time.monotonic() - started,
            )

    return serve


def wrap(app: WSGIApp, sock: socket.socket, path: str | None, access_log: bool) -> WSGIApp:
    """What bjoern calls: the app, with HEAD answered right and the addresses fixed."""
    inner = _logged(app) if access_log else app
    if sock.family == socket.AF_INET:

        def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            environ.setdefault("QUERY_STRING", "")  # PEP 3333: bjoern omits an empty one
            if environ["REQUEST_METHOD"] == "HEAD":
                return _head(inner, environ, start_response)
            return inner(environ, start_response)

        return serve

    if sock.family == socket.AF_INET6:
        host, port = sock.getsockname()[:2]
        fixed = {"SERVER_NAME": host, "SERVER_PORT": str(port)}

        def serve_v6(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            environ.update(fixed)
            environ.setdefault("QUERY_STRING", "")
            del environ["REMOTE_ADDR"]  # bjoern read an IPv6 peer as IPv4: unknown
            if environ["REQUEST_METHOD"] == "HEAD":
                return _head(inner, environ, start_response)
            return inner(environ, start_response)

        return serve_v6

    unix = path or ""

    def serve_unix(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ["REMOTE_ADDR"] = unix
        environ.setdefault("QUERY_STRING", "")
        host = environ.get("HTTP_HOST")
        if host:  # the name the client used, as the wsgiref backend does
            environ["SERVER_NAME"] = host if "]" in host else host.rsplit(":", 1)[0]
        else:
            environ["SERVER_NAME"] = unix
        if environ["REQUEST_METHOD"] == "HEAD":
            return _head(inner, environ, start_response)
        return inner(environ, start_response)

    return serve_unix


# -- the adapter --


class BjoernServer(Server):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        listener = self.listener.sock
        self.tcp = listener.family in (socket.AF_INET, socket.AF_INET6)
        self.sock = socket.socket(fileno=os.dup(listener.fileno()))
        self.sock.setblocking(False)  # a peer process may take a connection first
        if self.tcp:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.served = wrap(
            self.app, self.sock, self.listener.unix_path(), access.isEnabledFor(logging.INFO)
        )
        self.thread: threading.Thread | None = None
        self.sigint: Any = None  # the lifecycle's SIGINT handler, while we stop bjoern
        self.stopping = False
        self.previous_hook = sys.excepthook
        self.failure = "its loop returned"

    # -- Server API --

    def start(self) -> None:
        """Start bjoern's loop in a thread; give SIGINT back to Python once it has taken it."""
        python_handler = _c_handler(signal.SIGINT)
        # Started with SIGINT blocked, bjoern's thread keeps it blocked: the signal is for
        # the main thread. Meanwhile a SIGINT waits instead of reaching bjoern's handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            sys.excepthook = self._excepthook
            self.thread = threading.Thread(target=self._run, name="chaussette-bjoern", daemon=True)
            self.thread.start()
            deadline = time.monotonic() + 5
            while _c_handler(signal.SIGINT) == python_handler and self.thread.is_alive():
                if time.monotonic() > deadline:
                    log.warning("bjoern did not install its SIGINT handler; leaving SIGINT as is")
                    break
                time.sleep(0.001)
            signal.signal(signal.SIGINT, signal.getsignal(signal.SIGINT))  # Python's again
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if not self.thread.is_alive():
            raise ChaussetteError(f"bjoern stopped as it started: {self.failure}")

    def stop_accepting(self) -> None:
        if self.stopping or self.thread is None or not self.thread.is_alive():
            return
        self.stopping = True
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        self.sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        _feed_sigint()
        self._shut_reading()

    def wait_idle(self, timeout: float) -> bool:
        thread = self.thread
        if thread is None:
            return True
        if not self.stopping:  # nothing was asked to stop: bjoern is never idle by itself
            thread.join(timeout)
            return not thread.is_alive()
        deadline = time.monotonic() + timeout
        while True:
            if _c_handler(signal.SIGINT) != _SIG_IGN:
                # bjoern's watcher stopped (it reset SIGINT to the default action): it
                # accepts no more, so the connections seen now are all there will be
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                self._shut_reading()
            thread.join(max(0.0, min(_POLL, deadline - time.monotonic())))
            if not thread.is_alive():
                self._stopped()
                return True
            if time.monotonic() >= deadline:
                return False

    def in_flight(self) -> int:
        if self.thread is None or not self.thread.is_alive():
            return 0
        if not self.stopping:
            return int(self._in_app())
        conns = self._connections()  # idle ones were told to go: these are busy
        for conn in conns:
            conn.close()
        return len(conns)

    def close(self) -> None:
        if sys.excepthook == self._excepthook:
            sys.excepthook = self.previous_hook
        if self.thread is None or not self.thread.is_alive():
            self.sock.close()  # else bjoern's loop may still use it: the process ends soon

    # -- inside --

    def _run(self) -> None:
        try:
            bjoern.server_run(self.sock, self.served)
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("bjoern stopped with an error")

    def _stopped(self) -> None:
        """bjoern's loop has ended (and its simulated SIGINT was ignored)."""
        if self.sigint is not None:
            signal.signal(signal.SIGINT, self.sigint)
            self.sigint = None
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def _excepthook(self, etype: type[BaseException], value: BaseException, tb: Any) -> None:
        thread = self.thread
        if thread is not None and threading.get_ident() == thread.ident:
            log.error("error in the application", exc_info=(etype, value, tb))
            # PyErr_Print kept them for a debugger: they hold the request's frames
            sys.last_type = sys.last_value = sys.last_traceback = None
        else:
            self.previous_hook(etype, value, tb)

    def _in_app(self) -> bool:
        """Is bjoern's thread running Python code (the app, its iterable, its close)?"""
        thread = self.thread
        frame = sys._current_frames().get(thread.ident) if thread and thread.ident else None
        return frame is not None and frame.f_code not in _LOOP_CODE

    def _connections(self) -> list[socket.socket]:
        """Duplicates of the connections bjoern accepted (close them after use)."""
        found = []
        want = self.sock.getsockname()
        for name in os.listdir("/proc/self/fd"):
            try:
                if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    continue
                dup = socket.socket(fileno=os.dup(int(name)))
            except OSError:  # closed meanwhile
                continue
            try:
                if (
                    dup.family == self.sock.family
                    and not dup.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and _same_address(dup.getsockname(), want)
                ):
                    found.append(dup)
                    continue
            except OSError:
                pass
            dup.close()
        return found

    def _shut_reading(self) -> None:
        for conn in self._connections():
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            finally:
                conn.close()


# the Python frames of bjoern's thread while its C loop runs (anything above is app code)
_LOOP_CODE = frozenset((BjoernServer._run.__code__, bjoern.server_run.__code__))


def _same_address(name: Any, listening: Any) -> bool:
    """Is ``name`` (an accepted socket's own address) the listener's address?"""
    if isinstance(listening, tuple):
        host, port = listening[:2]
        if name[1] != port:
            return False
        return host in ("0.0.0.0", "::") or name[0] == host
    return bool(name == listening)
