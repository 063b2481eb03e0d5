"""The ``wsgiref`` backend: HTTP/1.x with the standard library only.

The classic chaussette served ``wsgiref.simple_server``: one request at a time, a listen
queue of 5, the process environment leaked into every environ. This keeps the name and the
zero dependencies, and is a usable server:

- worker threads started on demand, at most ``--threads``, kept while idle; each serves
  one connection at a time; at the bound the accept loop waits and new connections queue
  in the kernel (``--backlog``);
- one request per connection (``Connection: close``), HTTP/1.1 responses without a length
  are chunked so that a cut response is visible as cut;
- the request line and the header block are bounded (414 / 431), a malformed head gets 400;
  header names with ``_`` are dropped (they would alias ``-`` names in the environ);
  Content-Length together with Transfer-Encoding is refused (request smuggling);
- chunked request bodies are decoded; ``Expect: 100-continue`` is answered on first read;
- ``wsgi.file_wrapper`` files go out with ``sendfile``;
- on a unix socket REMOTE_ADDR is the socket path.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import selectors
import socket
import threading
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import unquote_to_bytes
from wsgiref.util import FileWrapper

from chaussette import __version__
from chaussette.backends.base import Server
from chaussette.wsgi import BodyReader, BodyTruncated, ErrorStream, Response

if TYPE_CHECKING:
    from chaussette.settings import Settings
    from chaussette.sockets import Listener

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

SERVER_SOFTWARE = f"chaussette/{__version__}"
_STATUS_TEXT = {
    400: "Bad Request",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}
_NO_BODY_CODES = frozenset((204, 304))
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
# the same sets as bytes, for checks done in C: ``not data.translate(None, ALLOWED)``
_METHOD_BYTES = bytes(sorted(_METHOD_CHARS))
_TOKEN_BYTES = bytes(sorted(_TOKEN_CHARS))
_TARGET_FORBIDDEN = bytes(range(0x21)) + b"\x7f"  # controls, space, DEL
_MAX_EMPTY_LINES = 8  # CRLFs tolerated before a request line
_SMALL_WRITE = 65536  # pieces up to this size are joined into one send


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class LineReader(Protocol):
    def readline(self, size: int | None = -1, /) -> bytes: ...


class Request:
    __slots__ = ("headers", "method", "target", "version")

    def __init__(
        self, method: str, target: str, version: str, headers: list[tuple[str, str]]
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers


def read_head(rfile: LineReader, max_line: int, max_headers: int) -> Request | None:
    """Read and check a request head. None if the client closed without sending one."""
    line = rfile.readline(max_line + 1)
    for _ in range(_MAX_EMPTY_LINES):  # RFC 9112: ignore empty lines before a request
        if line not in (b"\r\n", b"\n"):
            break
        line = rfile.readline(max_line + 1)
    else:
        raise BadRequest(400, "only empty lines instead of a request line")
    if not line:
        return None
    if len(line) > max_line or not line.endswith(b"\n"):
        if len(line) > max_line:
            raise BadRequest(414, f"request line longer than {max_line} bytes")
        raise BadRequest(400, "incomplete request line")
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if not method or method.translate(None, _METHOD_BYTES):
        raise BadRequest(400, "malformed method")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        if version.startswith(b"HTTP/"):
            raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are served")
        raise BadRequest(400, "malformed HTTP version")
    if not target or len(target.translate(None, _TARGET_FORBIDDEN)) != len(target):
        raise BadRequest(400, "malformed request target")
    headers: list[tuple[str, str]] = []
    budget = max_headers
    while True:
        raw = rfile.readline(budget + 1)
        if not raw.endswith(b"\n"):
            if len(raw) > budget:
                raise BadRequest(431, f"request headers larger than {max_headers} bytes")
            raise BadRequest(400, "incomplete headers")
        budget -= len(raw)
        if budget < 0:
            raise BadRequest(431, f"request headers larger than {max_headers} bytes")
        raw = raw.rstrip(b"\r\n")
        if not raw:
            break
        if raw[:1] in (b" ", b"\t"):
            raise BadRequest(400, "obsolete header line folding")
        name, sep, value = raw.partition(b":")
        if not sep or not name or name.translate(None, _TOKEN_BYTES):
            raise BadRequest(400, "malformed header line")
        if b"\0" in value or b"\r" in value:
            raise BadRequest(400, "invalid character in a header value")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return Request(
        method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"), headers
    )


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header value, formatted at most once per second."""
    global _date_cache
    now = int(time.time())
    second, text = _date_cache  # one tuple: threads see a consistent pair
    if second != now:
        text = formatdate(now, usegmt=True)
        _date_cache = (now, text)
    return text


class HTTPSink:
    """HTTP/1.x response framing on a blocking socket with a timeout.

    Every wait for the client is bounded by the socket timeout, but not the whole transfer:
    ``sendall``'s timeout is a total and would cut a slow but steady download.

    With ``keep_alive`` (the client allows it) the connection stays open when the framing
    allows it; ``reusable`` says, after the response, whether the next request may follow.
    """

    def __init__(
        self, sock: socket.socket, version: str, head_only: bool, keep_alive: bool = False
    ) -> None:
        self.sock = sock
        self.version = version
        self.head_only = head_only
        self.chunked = False
        self.keep_alive = keep_alive
        self.finished = False

    @property
    def reusable(self) -> bool:
        return self.keep_alive and self.finished

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        code = int(status[:3])
        has_length = False
        has_server = False
        for name, _ in headers:
            lower = name.lower()
            if lower == "content-length":
                has_length = True
            elif lower == "server":
                has_server = True
        lines = [f"HTTP/1.1 {status}", f"Date: {http_date()}"]
        if not has_server:
            lines.append(f"Server: {SERVER_SOFTWARE}")
        lines.extend(f"{n}: {v}" for n, v in headers)
        bodyless = self.head_only or code in _NO_BODY_CODES or code < 200
        if not has_length and not bodyless:
            if self.version == "HTTP/1.1":
                self.chunked = True
                lines.append("Transfer-Encoding: chunked")
            else:
                self.keep_alive = False  # HTTP/1.0: the close ends the body
        if not self.keep_alive:
            lines.append("Connection: close")
        elif self.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if bodyless:
            body = b""
        self._write(head, *self._frame(body))

    def _frame(self, data: bytes) -> tuple[bytes, ...]:
        if not data:
            return ()
        if self.chunked:
            return (b"%x\r\n" % len(data), data, b"\r\n")
        return (data,)

    def _write(self, *parts: bytes) -> None:
        if len(parts) > 1 and sum(map(len, parts)) <= _SMALL_WRITE:
            parts = (b"".join(parts),)  # one segment for small responses (TCP_NODELAY is on)
        for part in parts:
            with memoryview(part) as view:
                sent = 0
                while sent < len(view):
                    sent += self.sock.send(view[sent:])

    def send_body(self, data: bytes) -> None:
        if not self.head_only:
            self._write(*self._frame(data))

    def send_file(self, file: BinaryIO, count: int | None) -> int | None:
        if self.chunked:
            return None
        if self.head_only:
            return 0
        # socket.sendfile starts at ``offset``, not at the file position: PEP 3333 wants
        # the transfer to begin where the app left the file.
        return self.sock.sendfile(file, file.tell(), count)

    def finish(self) -> None:
        if self.chunked and not self.head_only:
            self._write(b"0\r\n\r\n")
        self.finished = True

    def abort(self) -> None:
        self.chunked = False  # never send the last chunk: the client sees the cut
        self.keep_alive = False


class _LengthSource:
    def __init__(self, rfile: Any, length: int) -> None:
        self.rfile = rfile
        self.left = length

    def __call__(self, size: int) -> bytes:
        if self.left <= 0:
            return b""
        try:
            data: bytes = self.rfile.read1(min(size, self.left))
        except OSError as exc:  # timed out, reset
            raise BodyTruncated(f"reading the body: {exc}") from exc
        if not data:
            raise BodyTruncated(f"client closed with {self.left} body bytes unsent")
        self.left -= len(data)
        return data

    @property
    def done(self) -> bool:
        return self.left <= 0


class _ChunkedSource:
    MAX_LINE = 4096
    MAX_TRAILERS = 100

    def __init__(self, rfile: Any) -> None:
        self.rfile = rfile
        self.left = 0  # bytes left in the current chunk
        self.done = False

    def _line(self) -> bytes:
        line: bytes = self.rfile.readline(self.MAX_LINE + 1)
        if not line.endswith(b"\n"):
            raise BodyTruncated("malformed or cut chunked body")
        return line.rstrip(b"\r\n")

    def __call__(self, size: int) -> bytes:
        try:
            return self._read(size)
        except BodyTruncated:
            raise
        except OSError as exc:  # timed out, reset
            raise BodyTruncated(f"reading the body: {exc}") from exc

    def _read(self, size: int) -> bytes:
        if self.done:
            return b""
        if self.left == 0:
            size_text = self._line().split(b";", 1)[0].rstrip(b" \t")
            if not size_text or len(size_text) > 16 or not set(size_text) <= _HEX_DIGITS:
                raise BodyTruncated(f"malformed chunk size {size_text[:20]!r}")
            self.left = int(size_text, 16)
            if self.left == 0:
                for _ in range(self.MAX_TRAILERS):
                    if not self._line():
                        break
                else:
                    raise BodyTruncated("too many trailer lines")
                self.done = True
                return b""
        data: bytes = self.rfile.read1(min(size, self.left))
        if not data:
            raise BodyTruncated("client closed inside a chunk")
        self.left -= len(data)
        if self.left == 0 and self._line():
            raise BodyTruncated("chunk not followed by CRLF")
        return data


class HTTP1:
    """The HTTP/1.x side of one listener, shared by the ``wsgiref`` and ``fastgevent``
    backends: the environ of a request, refusals, the lingering close, the access log line.
    """

    def __init__(self, listener: Listener, settings: Settings, multithread: bool) -> None:
        self.max_line = settings.limit_request_line
        self.max_headers = settings.limit_request_headers
        sock = listener.sock
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.unix_path = ""
        if self.tcp:
            host, port = sock.getsockname()[:2]
            server_name, server_port = str(host), str(port)
        else:
            self.unix_path = listener.unix_path() or ""
            server_name, server_port = self.unix_path, ""
        self.log_access = access.isEnabledFor(logging.INFO)
        # what every environ starts with (wsgi.errors is per request: it buffers a line)
        self.base: dict[str, Any] = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": server_name,
            "SERVER_PORT": server_port,
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.multithread": multithread,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
        }

    def client(self, addr: Any) -> str:
        return str(addr[0]) if self.tcp else self.unix_path

    def environ(
        self, request: Request, rfile: Any, conn: socket.socket, addr: Any
    ) -> tuple[dict[str, Any] | None, Any]:
        """The environ and body source of a request; (None, None) when it was refused
        (the refusal is sent: close the connection)."""
        target = request.target
        if "://" in target and not target.startswith("/"):  # absolute-form
            rest = target.split("://", 1)[1]
            target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        path, _, query = target.partition("?")
        if "#" in path:
            path = path.split("#", 1)[0]
        environ = self.base.copy()
        environ["REQUEST_METHOD"] = request.method
        # PEP 3333: the bytes the client sent, percent-decoded, as latin-1 text
        environ["PATH_INFO"] = (
            unquote_to_bytes(path.encode("latin-1")).decode("latin-1") if "%" in path else path
        )
        environ["QUERY_STRING"] = query.split("#", 1)[0] if "#" in query else query
        environ["RAW_URI"] = environ["REQUEST_URI"] = request.target
        environ["SERVER_PROTOCOL"] = request.version
        environ["wsgi.errors"] = ErrorStream()
        if self.tcp:
            environ["REMOTE_ADDR"] = str(addr[0])
            environ["REMOTE_PORT"] = str(addr[1])
        else:
            environ["REMOTE_ADDR"] = self.unix_path
        length: str | None = None
        chunked = False
        expect_continue = False
        for name, value in request.headers:
            if "_" in name:
                continue  # X_Forwarded_For would alias X-Forwarded-For
            key = name.upper().replace("-", "_")
            if key == "CONTENT_LENGTH":
                if length is not None and length != value:
                    self.reject(conn, 400)
                    return None, None
                length = value
                continue
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
                continue
            if key == "TRANSFER_ENCODING":
                if value.lower() != "chunked":
                    self.reject(conn, 501)
                    return None, None
                chunked = True
            elif key == "EXPECT" and value.lower() == "100-continue":
                expect_continue = True
            elif key == "HOST" and "HTTP_HOST" in environ:
                self.reject(conn, 400)  # RFC 9112: exactly one Host
                return None, None
            key = "HTTP_" + key
            if key in environ:
                sep = "; " if key == "HTTP_COOKIE" else ", "
                environ[key] += sep + value
            else:
                environ[key] = value
        if chunked and length is not None:
            self.reject(conn, 400)  # both framings: a smuggling attempt
            return None, None
        source: _LengthSource | _ChunkedSource
        if chunked:
            source = _ChunkedSource(rfile)
            # No CONTENT_LENGTH: tell apps (Werkzeug) that read() ends at the body's end.
            # Only here: with a length they read by it, and setting it always makes Werkzeug
            # call read() without a size, which PEP 3333 (and wsgiref.validate) forbid.
            environ["wsgi.input_terminated"] = True
        else:
            if length is not None:
                if not (length.isascii() and length.isdigit()):
                    self.reject(conn, 400)
                    return None, None
                environ["CONTENT_LENGTH"] = length
            source = _LengthSource(rfile, int(length or 0))
        before = None
        if expect_continue and request.version == "HTTP/1.1" and not source.done:

            def before() -> None:
                try:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError as exc:
                    raise BodyTruncated(f"sending 100 Continue: {exc}") from exc

        environ["wsgi.input"] = BodyReader(source, before)
        host = environ.get("HTTP_HOST")
        if host and not self.tcp:
            environ["SERVER_NAME"] = host.rsplit(":", 1)[0] if "]" not in host else host
        return environ, source

    def reject(self, conn: socket.socket, status: int) -> None:
        text = _STATUS_TEXT.get(status, "Bad Request")
        body = f"{status} {text}\n".encode()
        head = (
            f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            conn.sendall(head + body)
            self.linger(conn)
        except OSError:
            pass

    @staticmethod
    def linger(conn: socket.socket) -> None:
        """Close without RST: closing with unread input would reset the connection and
        could destroy the response before the client reads it."""
        try:
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(1.0)
            budget = 1 << 20
            while budget > 0:
                data = conn.recv(65536)
                if not data:
                    break
                budget -= len(data)
        except OSError:
            pass

    @staticmethod
    def access_line(environ: dict[str, Any], status: int, length: int, duration: float) -> None:
        """One line to the ``chaussette.access`` logger (check ``log_access`` first)."""
        access.info(
            '%s - - [%s] "%s %s %s" %s %s "%s" "%s" %.3f',
            environ.get("REMOTE_ADDR", "-"),
            time.strftime("%d/%b/%Y:%H:%M:%S %z"),
            environ.get("REQUEST_METHOD", "-"),
            environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", ""),
            environ.get("SERVER_PROTOCOL", "-"),
            status or "-",
            length or "-",
            environ.get("HTTP_REFERER", "-"),
            environ.get("HTTP_USER_AGENT", "-"),
            duration,
        )


def wants_keep_alive(environ: dict[str, Any]) -> bool:
    """Does the client let the connection live after this response?"""
    tokens = environ.get("HTTP_CONNECTION", "").lower()
    if environ["SERVER_PROTOCOL"] == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


class WSGIRefServer(Server):
    """Worker threads made on demand up to ``--threads`` and kept while idle (ashd-wsgi's
    ``free:max``): steady load starts no thread. The accept loop hands each connection to
    an idle worker through a queue, or starts one; with ``--threads`` connections in flight
    it stops accepting and the next ones wait in the kernel backlog.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        s = self.settings
        self.http = HTTP1(self.listener, s, multithread=True)
        self.timeout = s.timeout or None
        self.max_threads = s.threads
        # ``lock`` guards the counters; ``idle`` (its condition) is notified when a slot
        # frees at the bound and when the last request ends
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.active = 0  # connections accepted and not yet closed
        self.workers = 0  # worker threads alive
        self.free = 0  # workers waiting on the queue, or about to
        self.queue: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self.closed = False
        self.stopping = threading.Event()
        self.wake_r, self.wake_w = os.pipe()
        self.thread: threading.Thread | None = None

    # -- Server API --

    def start(self) -> None:
        self.listener.sock.setblocking(False)
        self.thread = threading.Thread(
            target=self._accept_loop, name="chaussette-accept", daemon=True
        )
        self.thread.start()

    def stop_accepting(self) -> None:
        self.stopping.set()
        os.write(self.wake_w, b"x")
        if self.thread is not None:
            self.thread.join()

    def wait_idle(self, timeout: float) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: self.active == 0, timeout)

    def in_flight(self) -> int:
        return self.active

    def close(self) -> None:
        with self.lock:
            self.closed = True
            count = self.workers
        for _ in range(count):  # one each: idle workers exit now, busy ones when done
            self.queue.put(None)
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- accepting --

    def _accept_loop(self) -> None:
        listener = self.listener.sock
        bound = self.max_threads
        stopping = self.stopping
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self.wake_r, selectors.EVENT_READ)
            while not stopping.is_set():
                if self.active >= bound:  # at the bound: let the kernel queue hold
                    with self.idle:
                        while self.active >= bound:
                            self.idle.wait(0.5)
                            if stopping.is_set():
                                return
                # accept first: under load a connection is usually waiting already
                conn = self._accept(listener)
                while conn is None and not stopping.is_set():
                    if any(key.fileobj == self.wake_r for key, _ in sel.select()):
                        break
                    conn = self._accept(listener)
                if conn is not None:
                    self._dispatch(conn)

    def _accept(self, listener: socket.socket) -> tuple[socket.socket, Any] | None:
        try:
            return listener.accept()
        except BlockingIOError:
            return None  # nothing yet, or another process sharing the socket took it
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept failed: %s; retrying in 0.1 s", exc.strerror)
                time.sleep(0.1)
            elif exc.errno != errno.ECONNABORTED:
                log.error("accept failed: %s", exc)
            return None

    def _dispatch(self, conn: tuple[socket.socket, Any]) -> None:
        with self.lock:
            self.active += 1
            if self.free:
                self.free -= 1
                spawn = False
            else:  # fewer than --threads connections in flight: a worker may be added
                self.workers += 1
                spawn = True
        if not spawn:
            self.queue.put(conn)
            return
        thread = threading.Thread(
            target=self._worker, args=(conn,), daemon=True, name="chaussette-worker"
        )
        try:
            thread.start()
        except RuntimeError:  # can't start new thread
            log.error("cannot start a thread for a connection; closing it")
            conn[0].close()
            with self.lock:
                self.workers -= 1
            self._done(idle_worker=False)

    def _done(self, idle_worker: bool) -> None:
        with self.lock:
            if idle_worker:
                self.free += 1  # before the slot frees: the accept loop will reuse it
            self.active -= 1
            if self.active == 0 or self.active == self.max_threads - 1:
                self.idle.notify_all()

    def _worker(self, item: tuple[socket.socket, Any] | None) -> None:
        get = self.queue.get
        while item is not None:
            self._serve(*item)
            if self.closed:
                break
            item = get()
        with self.lock:
            self.workers -= 1

    # -- one connection, one request --

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(self.timeout)
            if self.http.tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handle(conn, addr)
        except Exception:
            log.exception("unexpected error serving a connection")
        finally:
            try:
                conn.close()
            finally:
                self._done(idle_worker=not self.closed)

    def _handle(self, conn: socket.socket, addr: Any) -> None:
        http = self.http
        started = time.monotonic()
        rfile = conn.makefile("rb", buffering=65536)
        try:
            try:
                request = read_head(rfile, http.max_line, http.max_headers)
            except BadRequest as exc:
                log.info("bad request from %s: %s", http.client(addr), exc)
                http.reject(conn, exc.status)
                return
            except (TimeoutError, ConnectionError):
                return
            if request is None:
                return
            environ, source = http.environ(request, rfile, conn, addr)
            if environ is None:
                return
            sink = HTTPSink(conn, request.version, request.method == "HEAD")
            response = Response(self.app, environ, sink)
            response.run()
            if http.log_access:
                http.access_line(
                    environ, response.status_code, response.body_bytes, time.monotonic() - started
                )
            if source is not None and not source.done:
                http.linger(conn)
        finally:
            rfile.close()
