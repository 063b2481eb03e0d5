"""The ``tornado`` backend: tornado's HTTP/1.1 server, the app in a pool of threads.

tornado's ``WSGIContainer`` is not used: it joins the whole response in memory before
sending a byte (no streaming, a slow client's download held whole), leaves the client
waiting forever when the app raises, has no ``wsgi.file_wrapper`` and joins repeated headers
without a space. Instead:

- tornado's ``HTTPServer`` parses requests and writes responses on its IOLoop, which runs in
  a background thread, on the listening socket adopted with ``add_sockets`` (a duplicate of
  its descriptor, so that tornado's ``stop()`` leaves ours open for the lifecycle);
- each request, its body read whole first, runs in one of ``--threads`` daemon threads
  through chaussette's WSGI host (``chaussette.wsgi``: strict ``start_response``, 500 before
  the headers, a cut connection after, the iterable always closed);
- the response streams: every piece the app yields is handed to the IOLoop at once and sent
  in order; the app's thread waits only while more than 1 MiB is unsent (a slow client holds
  one thread, never the IOLoop), and gives up after ``--timeout`` seconds without progress.

Keep-alive and pipelining are tornado's. Request bodies are read by the adapter, on
tornado's stream, whole before the app runs: tornado refuses chunk extensions and trailer
fields, and bounds only a body's whole transfer. A chunked body reaches the app de-chunked,
with a CONTENT_LENGTH; ``Expect: 100-continue`` is answered as its reading starts; each wait
for the client is bounded by ``--timeout``, as is the wait for a next request (tornado's
``idle_connection_timeout``). ``--limit-request-headers`` is tornado's ``max_header_size``
(a larger head closes the connection without an answer: tornado's way); a longer request
line than ``--limit-request-line`` gets 414. TCP_NODELAY is set on every accepted TCP
connection and kept on (tornado would turn it off between responses).

Drain: tornado stops accepting; a connection waiting for its next request after serving
one (idle keep-alive) is closed at once; one accepted but still silent gets ``FRESH_GRACE``
seconds to send its first request (its client sent it, or is about to: closing it would
fail a request no other worker can take over); never one with request bytes already
received. A response started during the drain says ``Connection: close`` and its
connection is closed after it. It is done when no request is being received, run or sent
and no connection is left waiting for its grace.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import formatdate
from functools import partial
from io import BytesIO
from typing import Any
from urllib.parse import unquote_to_bytes
from wsgiref.util import FileWrapper

import tornado
from tornado.httpserver import HTTPServer
from tornado.httputil import (
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerConnectionDelegate,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError, UnsatisfiableReadError

from chaussette import __version__
from chaussette.backends.base import FRESH_GRACE, Server, pending_bytes
from chaussette.wsgi import ErrorStream, Response, WSGIApp

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

SERVER_SOFTWARE = f"chaussette/{__version__} TornadoServer/{tornado.version}"
HIGH_WATER = 1 << 20  # unsent bytes of one response before its thread waits
PIECE = 256 * 1024  # bigger bodies are handed over in pieces (progress is seen per piece)
THREAD_WAIT = 5.0  # bound on waiting for the IOLoop thread
MAX_LINE = 4096  # a chunk-size line or a trailer field
MAX_TRAILERS = 100
_BODYLESS = frozenset((204, 304))
_HEX_DIGITS = b"0123456789abcdefABCDEF"
SWEEP = 0.1  # seconds between two looks at waiting connections while draining


def _pending_bytes(stream: Any) -> int:
    """Request bytes received on a connection and not parsed yet: in tornado's buffer or
    in the kernel's (0 when unknown)."""
    count: int = getattr(stream, "_read_buffer_size", 0)
    return count + pending_bytes(stream.socket)


class _BadChunk(Exception):
    pass


class _Sink:
    """The response side of one request, called from the app's thread.

    Each call queues an operation for the IOLoop; the operations run there in order, each
    once the previous write is flushed. Writes account their bytes, so the app's thread can
    wait for room, and learn that the client went away.
    """

    def __init__(self, request: _Request, head_only: bool) -> None:
        self.request = request
        self.conn = request.conn
        self.loop = request.gateway.ioloop
        self.timeout = request.gateway.timeout
        self.head_only = head_only
        self.close_after = False
        self.cond = threading.Condition()
        self.ops: deque[tuple[int, Callable[[], Any]]] = deque()
        self.scheduled = False  # the IOLoop will look at ``ops`` without being woken
        self.writing = False  # IOLoop side: a write is in progress
        self.unsent = 0
        self.progress = time.monotonic()
        self.error: OSError | None = None

    # -- the app's thread --

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        code = int(status[:3])
        bodyless = self.head_only or code in _BODYLESS or code < 200
        fields = HTTPHeaders()
        for name, value in headers:
            if (code == 204 or code < 200) and name.lower() == "content-length":
                continue  # RFC 9110: none on 1xx and 204
            fields.add(name, value)
        if "Server" not in fields:
            fields["Server"] = SERVER_SOFTWARE
        if "Date" not in fields:
            fields["Date"] = formatdate(usegmt=True)
        version = self.request.start_line.version
        unframed = version == "HTTP/1.0" and "Content-Length" not in fields and not bodyless
        if self.request.gateway.draining or unframed:
            # The connection ends after this response (the end of an HTTP/1.0 body without
            # a length is the end of the connection): say so. tornado reads the request's
            # Connection header to decide what to announce.
            self.request.headers["Connection"] = "close"
            if version != "HTTP/1.0":
                fields["Connection"] = "close"
            self.close_after = unframed
        start = ResponseStartLine("HTTP/1.1", code, status[4:])
        view = memoryview(b"" if bodyless else body)
        first, rest = view[:PIECE], view[PIECE:]

        def write_headers() -> Any:
            return self.conn.write_headers(start, fields, chunk=first or None)

        self._post(len(first) + 1, write_headers)
        self._send(rest)

    def send_body(self, data: bytes) -> None:
        if not self.head_only:
            self._send(data)

    def send_file(self, file: Any, count: int | None) -> int | None:
        return None  # no sendfile through an IOStream: the host iterates the file

    def finish(self) -> None:
        self._post(0, self._finish)

    def abort(self) -> None:
        self._post(0, self.conn.close)  # after what was sent: the client sees the cut

    def _send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), PIECE):
            piece = view[start : start + PIECE]
            self._post(len(piece), partial(self.conn.write, piece))

    def _post(self, size: int, op: Callable[[], Any]) -> None:
        with self.cond:
            if self.error is not None:
                raise self.error
            self.unsent += size
            self.ops.append((size, op))
            wake = not self.scheduled
            self.scheduled = True
        if wake:
            self.loop.add_callback(self._run)
        if self.unsent > HIGH_WATER:
            self._wait_for_room()

    def _wait_for_room(self) -> None:
        with self.cond:
            while self.unsent > HIGH_WATER and self.error is None:
                left = self.progress + self.timeout - time.monotonic()
                if left <= 0:
                    self.error = TimeoutError(f"the client read nothing for {self.timeout:g} s")
                    self.loop.add_callback(self.conn.close)
                    break
                self.cond.wait(left)
            if self.error is not None:
                raise self.error

    # -- the IOLoop thread --

    def _run(self) -> None:
        if self.writing:
            return  # the write in progress calls back when done
        while True:
            with self.cond:
                if not self.ops:
                    self.scheduled = False
                    return
                size, op = self.ops.popleft()
            try:
                done = op()
            except Exception as exc:  # tornado refused the response: end the connection
                log.error("tornado could not send a response: %s", exc)
                self.conn.close()
                self._account(size, failed=True)
                continue
            if done is not None and not done.done():
                self.writing = True
                done.add_done_callback(partial(self._written, size))
                return
            self._account(size)

    def _written(self, size: int, _: object) -> None:
        self.writing = False
        self._account(size)
        self._run()

    def _account(self, size: int, failed: bool = False) -> None:
        # tornado resolves a write's future even when the stream closed under it
        stream = self.conn.stream
        gone = failed or stream is None or stream.closed()
        with self.cond:
            self.unsent -= size
            self.progress = time.monotonic()
            if gone and self.error is None:
                self.error = ConnectionResetError("the client closed the connection")
            self.cond.notify_all()

    def _finish(self) -> None:
        self.conn.finish()
        if self.close_after:
            self.conn.close()


class _Request(HTTPMessageDelegate):
    """One request on one connection, from its headers to the end of its response."""

    def __init__(self, gateway: _Gateway, server_conn: Any, conn: Any, first: bool) -> None:
        self.gateway = gateway
        self.server_conn = server_conn
        self.conn = conn
        self.first = first  # the first request of its connection (none was served yet)
        self.start_line: RequestStartLine
        self.headers: HTTPHeaders
        self.chunks: list[bytes] = []
        self.tracked = False  # counted in flight
        self.running = False  # the app is being run for it
        self.conn_done = False  # its connection moved to the next request or closed
        self.rejected = False  # answered without the app
        self.has_body = False  # it came with a body (framed by a length or chunked)
        self.expect: str | None = None  # its Expect header, answered here

    def headers_received(
        self, start_line: Any, headers: HTTPHeaders
    ) -> Coroutine[Any, Any, None] | None:
        if len(start_line.method) + len(start_line.path) + 10 > self.gateway.max_line:
            self.reject(414, "URI Too Long")
            return None
        self.start_line, self.headers = start_line, headers
        self.gateway.track(self)
        coding = headers.get("Transfer-Encoding")
        length_text = headers.get("Content-Length")
        if coding is None and length_text is None:
            return None
        # The body is read here, not by tornado, which refuses chunk extensions and trailer
        # fields (RFC 9112 allows both) and bounds a body's whole transfer rather than each
        # wait (--timeout). Seeing no framing left, tornado reads no body.
        length: int | None = None
        if coding is not None:
            if length_text is not None:
                self.reject(400, "Bad Request")  # both framings: a smuggling attempt
                return None
            if coding.strip().lower() != "chunked":
                self.reject(501, "Not Implemented")
                return None
            del headers["Transfer-Encoding"]
        else:
            assert length_text is not None
            values = {value.strip() for value in length_text.split(",")}  # repeated: joined
            text = values.pop() if len(values) == 1 else ""
            if not (text.isascii() and text.isdigit()):
                self.reject(400, "Bad Request")
                return None
            length = int(text)
            if length > self.conn.stream.max_buffer_size:
                self.reject(413, "Content Too Large")
                return None
            del headers["Content-Length"]
        self.has_body = True
        if length == 0:
            return None
        if headers.get("Expect", "").lower() == "100-continue":
            self.expect = headers.pop("Expect")  # tornado would answer after the body
            if start_line.version == "HTTP/1.1":
                self.conn.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return self.read_body(length)

    async def read_body(self, length: int | None) -> None:
        stream = self.conn.stream
        try:
            if length is None:
                await self.read_chunked(stream)
            else:
                while length:
                    piece = await self._within(stream.read_bytes(min(length, PIECE), True))
                    self.chunks.append(piece)
                    length -= len(piece)
        except _BadChunk:
            self.reject(400, "Bad Request")
        except (StreamClosedError, UnsatisfiableReadError, asyncio.TimeoutError):
            self.rejected = True  # the client left, or was silent too long: no request
            stream.close()

    async def read_chunked(self, stream: Any) -> None:
        total = 0
        while True:
            line = await self._within(stream.read_until(b"\r\n", max_bytes=MAX_LINE))
            size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 16 or size_text.strip(_HEX_DIGITS):
                raise _BadChunk
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > stream.max_buffer_size:
                raise _BadChunk
            while size:
                piece = await self._within(stream.read_bytes(min(size, PIECE), True))
                self.chunks.append(piece)
                size -= len(piece)
            if await self._within(stream.read_bytes(2)) != b"\r\n":
                raise _BadChunk
        for _ in range(MAX_TRAILERS):
            if await self._within(stream.read_until(b"\r\n", max_bytes=MAX_LINE)) == b"\r\n":
                return
        raise _BadChunk

    async def _within(self, future: Awaitable[bytes]) -> bytes:
        """A read, bounded by --timeout."""
        if isinstance(future, asyncio.Future) and future.done():
            data: bytes = future.result()  # already buffered: no timer
            return data
        return await asyncio.wait_for(future, self.gateway.timeout)

    def reject(self, status: int, reason: str) -> None:
        """Answer an error and close the connection; the app is not called."""
        self.rejected = True
        body = f"{status} {reason}\n".encode()
        fields = HTTPHeaders(
            {"Content-Type": "text/plain", "Content-Length": str(len(body)), "Connection": "close"}
        )
        self.conn.write_headers(ResponseStartLine("HTTP/1.1", status, reason), fields, chunk=body)
        self.conn.finish()  # before the body is read: tornado closes the connection after

    def data_received(self, chunk: bytes) -> None:
        if not self.rejected:
            self.chunks.append(chunk)

    def finish(self) -> None:
        if self.rejected:
            return
        if self.expect is not None:
            self.headers["Expect"] = self.expect  # for the environ
        self.running = True
        self.gateway.pool.submit(self.gateway.respond, self)

    def on_connection_close(self) -> None:
        self.connection_done()

    def connection_done(self) -> None:
        self.conn_done = True
        self.gateway.release(self)


class _Gateway(HTTPServerConnectionDelegate):
    """Starts a ``_Request`` for every request; knows which are in flight."""

    def __init__(self, adapter: TornadoServer) -> None:
        s = adapter.settings
        self.app: WSGIApp = adapter.app
        self.pool = _Pool(s.threads)
        self.timeout: float = s.timeout
        self.max_line: int = s.limit_request_line
        self.ioloop: IOLoop
        sock = adapter.listener.sock
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if self.tcp:
            host, port = sock.getsockname()[:2]
            self.server_name, self.server_port, self.unix_path = str(host), str(port), ""
        else:
            path = adapter.listener.unix_path() or ""
            self.server_name, self.server_port, self.unix_path = path, "", path
        self.current: dict[Any, _Request] = {}  # IOLoop thread only
        self.lock = threading.Lock()
        self.active: set[_Request] = set()
        # connections a drain waits for with no request in flight: silent new ones (for
        # FRESH_GRACE) and ones with request bytes received (written by the IOLoop thread)
        self.holding: set[Any] = set()
        self.draining = False
        self.drain_started = 0.0
        self.drained = threading.Event()

    # -- the IOLoop thread --

    def start_request(self, server_conn: Any, request_conn: Any) -> HTTPMessageDelegate:
        previous = self.current.get(server_conn)
        if previous is not None:
            previous.connection_done()  # its response is sent: the connection is idle
        request = _Request(self, server_conn, request_conn, first=previous is None)
        self.current[server_conn] = request
        if self.draining:
            self.settle(server_conn, request)
            self.check_drained()
        return request

    def connection_closed(self, server_conn: Any) -> None:
        request = self.current.pop(server_conn, None)
        with self.lock:
            self.holding.discard(server_conn)
        if request is not None:
            request.connection_done()
        self.check_drained()

    def drain(self) -> None:
        with self.lock:
            self.draining = True
            self.drain_started = time.monotonic()
        self.sweep()

    def sweep(self) -> None:
        """While draining: close the connections waiting for a request that the drain need
        not wait for, and look again soon while some are left waiting."""
        for server_conn, request in list(self.current.items()):
            if not request.tracked:
                self.settle(server_conn, request)
        self.check_drained()
        if self.holding:
            self.ioloop.call_later(SWEEP, self.sweep)

    def settle(self, server_conn: Any, request: _Request) -> None:
        """A connection waiting for a request in a drain: close it if idle after a
        response, or silent since its accept for FRESH_GRACE; else the drain waits for it."""
        fresh = request.first and time.monotonic() - self.drain_started < FRESH_GRACE
        if fresh or _pending_bytes(server_conn.stream):
            with self.lock:
                self.holding.add(server_conn)
            return
        with self.lock:
            self.holding.discard(server_conn)
        server_conn.stream.close()

    def check_drained(self) -> None:
        with self.lock:
            if self.draining and not self.active and not self.holding:
                self.drained.set()

    # -- any thread --

    def track(self, request: _Request) -> None:
        with self.lock:
            request.tracked = True
            self.active.add(request)
            self.holding.discard(request.server_conn)

    def release(self, request: _Request) -> None:
        with self.lock:
            if request.tracked and request.conn_done and not request.running:
                request.tracked = False
                self.active.discard(request)
                if self.draining and not self.active and not self.holding:
                    self.drained.set()

    # -- a pool thread --

    def respond(self, request: _Request) -> None:
        try:
            started = time.monotonic()
            try:
                environ = self.environ(request)
            except Exception:
                log.exception("cannot serve a request: its environ failed")
                self.ioloop.add_callback(request.conn.close)
                return
            sink = _Sink(request, request.start_line.method == "HEAD")
            response = Response(self.app, environ, sink)
            response.run()
            if access.isEnabledFor(logging.INFO):
                self.log_access(environ, response, started)
        finally:
            with self.lock:
                request.running = False
            self.release(request)

    def environ(self, request: _Request) -> dict[str, Any]:
        start_line, headers = request.start_line, request.headers
        target = start_line.path
        if "://" in target and not target.startswith("/"):  # absolute-form
            rest = target.split("://", 1)[1]
            target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        path, _, query = target.partition("?")
        body = b"".join(request.chunks)
        request.chunks = []
        environ: dict[str, Any] = {
            "REQUEST_METHOD": start_line.method,
            "SCRIPT_NAME": "",
            # PEP 3333: the bytes the client sent, percent-decoded, as latin-1 text
            "PATH_INFO": unquote_to_bytes(path.encode("latin-1")).decode("latin-1"),
            "QUERY_STRING": query,
            "RAW_URI": start_line.path,
            "REQUEST_URI": start_line.path,
            "SERVER_NAME": self.server_name,
            "SERVER_PORT": self.server_port,
            "SERVER_PROTOCOL": start_line.version,
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
            "REMOTE_ADDR": self.unix_path,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": BytesIO(body),
            "wsgi.errors": ErrorStream(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
        }
        address = getattr(request.conn.context, "address", None)
        if self.tcp and isinstance(address, tuple):
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(address[0]), str(address[1])
        for name, value in headers.get_all():
            if "_" in name:
                continue  # X_Forwarded_For would alias X-Forwarded-For
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if key in environ:
                environ[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
            else:
                environ[key] = value
        if request.has_body:
            environ["CONTENT_LENGTH"] = str(len(body))  # the body as read, de-chunked
        host = environ.get("HTTP_HOST")
        if host and not self.tcp:
            environ["SERVER_NAME"] = host.rsplit(":", 1)[0] if "]" not in host else host
        return environ

    def log_access(self, environ: dict[str, Any], response: Response, started: float) -> None:
        access.info(
            '%s - - [%s] "%s %s %s" %s %s "%s" "%s" %.3f',
            environ.get("REMOTE_ADDR", "-"),
            time.strftime("%d/%b/%Y:%H:%M:%S %z"),
            environ["REQUEST_METHOD"],
            environ["RAW_URI"],
            environ["SERVER_PROTOCOL"],
            response.status_code or "-",
            response.body_bytes or "-",
            environ.get("HTTP_REFERER", "-"),
            environ.get("HTTP_USER_AGENT", "-"),
            time.monotonic() - started,
        )


class _HTTPServer(HTTPServer):
    """tornado's HTTPServer, telling the gateway when a connection closes, with
    TCP_NODELAY kept on."""

    request_callback: _Gateway

    def handle_stream(self, stream: Any, address: tuple[Any, ...]) -> None:
        sock = stream.socket
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # tornado turns Nagle back on between responses; the headers and the first
            # piece of a body go out in one write, but the pieces of a streamed body do not
            stream.set_nodelay = _keep_nodelay
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        self.request_callback.connection_closed(server_conn)


def _keep_nodelay(value: bool) -> None:
    return


class _Pool:
    """A fixed set of daemon threads: one stuck in the app never holds the exit
    (a ThreadPoolExecutor's threads are joined when the interpreter exits)."""

    def __init__(self, size: int) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self.size = size

    def start(self) -> None:
        for n in range(self.size):
            name = f"chaussette-tornado-{n}"
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.jobs.put((fn, args))

    def shutdown(self) -> None:
        for _ in range(self.size):
            self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, args = job
            try:
                fn(*args)
            except Exception:
                log.exception("unexpected error serving a request")


class TornadoServer(Server):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gateway = _Gateway(self)
        # tornado's stop() closes the sockets it was given: give it a duplicate
        self.sock = self.listener.sock.dup()
        self.sock.setblocking(False)  # tornado accepts until EAGAIN
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.server: _HTTPServer | None = None
        self.closed = False

    # -- Server API --

    def start(self) -> None:
        self.gateway.pool.start()
        self.thread = threading.Thread(target=self._run, name="chaussette-tornado", daemon=True)
        self.thread.start()
        if not self.ready.wait(THREAD_WAIT) or self.failure is not None:
            raise RuntimeError(f"tornado's IOLoop did not start: {self.failure}")

    def stop_accepting(self) -> None:
        done = threading.Event()

        def stop() -> None:
            try:
                if self.server is not None:
                    self.server.stop()  # closes our duplicate of the listening socket
                self.gateway.drain()
            finally:
                done.set()

        if self._call(stop) and not done.wait(THREAD_WAIT):
            log.error("tornado's IOLoop did not stop accepting within %ss", THREAD_WAIT)

    def wait_idle(self, timeout: float) -> bool:
        return self.gateway.drained.wait(timeout)

    def in_flight(self) -> int:
        return len(self.gateway.active)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.stop_event is not None and self._call(self.stop_event.set):
            assert self.thread is not None
            self.thread.join(THREAD_WAIT)
        self.gateway.pool.shutdown()
        self.sock.close()

    # -- the IOLoop thread --

    def _call(self, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` in the IOLoop thread; False if that loop is not running."""
        if self.aloop is None or self.thread is None or not self.thread.is_alive():
            return False
        try:
            self.aloop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop closed meanwhile
            return False
        return True

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.failure = exc
            log.critical("tornado's IOLoop failed; no request is served any more", exc_info=True)
        finally:
            self.ready.set()

    async def _main(self) -> None:
        s = self.settings
        self.aloop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.gateway.ioloop = IOLoop.current()
        self.server = server = _HTTPServer(
            self.gateway,
            max_header_size=s.limit_request_headers,
            idle_connection_timeout=s.timeout,
        )
        server.add_sockets([self.sock])
        self.ready.set()
        await self.stop_event.wait()
        server.stop()
        try:
            await asyncio.wait_for(server.close_all_connections(), THREAD_WAIT)
        except asyncio.TimeoutError:
            pass
