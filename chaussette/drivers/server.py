"""The ``Server`` of chaussette's own protocols (FastCGI, SCGI) on any engine.

- Connections are accepted while fewer than ``--max-conns`` are served; at the bound new
  ones wait in the listen queue. A connection takes a request slot (``--threads``,
  ``free:max``, ``--spawn``) only once a request head is complete: peers that connect and
  say nothing, or trickle their header block, hold no slot. TCP_NODELAY is set on each,
  and ``--timeout`` bounds each of its reads and writes: on threads the kernel does it
  (SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket: no poll() before each call); on greenlets
  one watchdog task closes a connection whose read or write has waited that long (no timer
  made and cancelled per wait).
- Requests are counted over all connections: ``in_flight`` (until their last byte is
  written), and FastCGI's ``--max-reqs`` (until their answer is complete).
- How a request runs: on gevent/eventlet in a greenlet of a pool of ``--spawn``; on threads
  after ``--request-model``: ``free`` (kept worker threads, at most N; at the bound the
  connection reader waits, so no new request is read), ``rplex`` (the app is called in a
  worker thread, the response iterated and written by one writer thread for all) or
  ``single`` (in the connection's own task, one at a time, no multiplexing).
- ``free`` on an engine with a descriptor watcher (threads, gevent): a FastCGI request
  alone on its connection runs in the reader's own task, saving a handoff per request;
  the watcher stands in for the reader and hands the reading to a new task if bytes come.
- A drain: stop accepting; a connection with no request in flight is closed at once when
  it has served one (an idle keep-alive connection), after ``FRESH_GRACE`` when it has not
  (a peer that just connected is about to send); requests in flight finish, then their
  connection closes. The drain ends when no connection is left, counted from its
  accept(): one accepted just before the drain, whose task has not run yet, is served too.
"""

from __future__ import annotations

import fcntl
import logging
import queue
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from chaussette.backends.base import Server
from chaussette.drivers.engine import Acceptor, Engine, FdWatcher, Pool
from chaussette.drivers.environ import base_environ
from chaussette.drivers.raw import RawRequest, RawSink, run_raw
from chaussette.drivers.response import BufferedResponse, BufferedSink, SteppedResponse
from chaussette.settings import RequestModel, parse_request_model
from chaussette.wsgi import BodyReader, ErrorStream

if TYPE_CHECKING:
    from chaussette.settings import Settings
    from chaussette.sockets import Listener
    from chaussette.wsgi import WSGIApp

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

DEFAULT_SPAWN = 1000  # greenlets serving requests at once when --spawn is not given
IDLE_TIMEOUT = 60.0  # seconds a kept worker thread waits for work before it exits
FRESH_GRACE = 1.0  # seconds a silent new connection may still send its request in a drain
LINGER = 2.0  # seconds we read (and drop) what a peer still sends after we closed
_POLL = 0.01  # seconds between two looks at the request count in wait_idle

# Application statuses in FastCGI's END_REQUEST
APP_OK = 0
APP_FAILED = 1  # the app raised, or its response was cut
APP_ABORTED = 2  # the peer aborted the request, or went away


def pending_bytes(sock: Any) -> int:
    """Bytes the kernel holds for us to read (0 when unknown)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


def send_all(sock: Any, data: bytes) -> None:
    """``sendall`` whose timeout bounds each wait, not the whole transfer."""
    sent = sock.send(data)
    if sent == len(data):
        return
    with memoryview(data) as view:
        size = len(view)
        while sent < size:
            sent += sock.send(view[sent:])


class Connection(Protocol):
    served: bool
    # when the read (the write) now waiting began, 0.0 when none waits: the watchdog's clock
    read_since: float
    write_since: float

    def run(self) -> None: ...
    def close_idle(self) -> bool: ...
    def shut(self) -> None: ...
    def expire(self) -> None: ...


class RequestSink(BufferedSink, RawSink, Protocol):
    """What a protocol gives a request to write its response with."""


class ErrorsTo(ErrorStream):
    """``wsgi.errors``: lines to the log, and the bytes to the protocol's error stream."""

    def __init__(self, sink: RawSink) -> None:
        self._partial = ""  # ErrorStream's state, set here: one made per request
        self._sink = sink

    def write(self, text: str) -> int:
        count = super().write(text)
        if text:
            self._sink.stderr(text.encode("utf-8", "replace"))
        return count


class Plexer:
    """``rplex``: ONE thread iterates every response, a chunk each in turn, and writes it.

    An iterator that blocks holds every response back meanwhile, as in ashd-wsgi: the
    model suits apps whose responses are computed in the app call and only streamed out.
    """

    def __init__(self, engine: Engine) -> None:
        self.queue: queue.SimpleQueue[tuple[SteppedResponse, Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        engine.spawn(self._loop)

    def add(self, response: SteppedResponse, done: Callable[[], None]) -> None:
        self.queue.put((response, done))

    def stop(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        active: deque[tuple[SteppedResponse, Callable[[], None]]] = deque()
        get = self.queue.get
        while True:
            item = get() if not active else self._poll()
            if item is None and not active:
                return
            if item is not None:
                active.append(item)
                continue  # take every new one before stepping
            response, done = active.popleft()
            try:
                more = response.step()
            except Exception:
                log.exception("unexpected error in the rplex writer")
                more = False
            if more:
                active.append((response, done))
            else:
                try:
                    done()
                except Exception:
                    log.exception("unexpected error ending a request")

    def _poll(self) -> tuple[SteppedResponse, Callable[[], None]] | None:
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None


class ProtocolServer(Server):
    """FastCGI or SCGI on an engine; subclasses set ``engine_class`` and ``connection``."""

    engine_class: ClassVar[type[Engine]]
    protocol: ClassVar[str]
    connection: ClassVar[Callable[..., Connection]]
    multiplexing: ClassVar[bool]  # several requests per connection (FastCGI)

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        super().__init__(app, listener, settings)
        engine = self.engine = self.engine_class()
        if engine.name == "threads":
            model = parse_request_model(settings.request_model)
            self.model = RequestModel(
                model.kind,
                model.max or settings.threads,
                IDLE_TIMEOUT if model.timeout is None else model.timeout,
            )
        else:
            self.model = RequestModel("free", settings.spawn or DEFAULT_SPAWN, None)
        self.raw = bool(settings.raw_handler)
        self.timeout: float | None = settings.timeout or None
        self.max_reqs: int = settings.max_reqs
        workers = settings.values.get("workers")
        self.base = base_environ(engine.multithread, bool(workers and workers > 1))
        sock = listener.sock
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.unix_name = "unix:" + (listener.unix_path() or "?")
        self.log_access = access.isEnabledFor(logging.INFO)
        self.count_lock = engine.core_lock()
        self.requests = 0  # in flight, until their last byte is written (what drains wait for)
        self.slots = 0  # counted against --max-reqs, until their answer is complete
        self.conns: set[Connection] = set()
        self.draining = False
        self.drain_started = 0.0
        # connections are bounded by --max-conns alone: a connection takes a request
        # slot only once its request head is complete (SCGI: in its own task, with
        # ``request_pool.acquire``), so silent peers hold no slot
        self.conn_pool = engine.pool(settings.max_conns, self.model.timeout, "chaussette-conn")
        self.request_pool: Pool | None = None
        if self.model.kind != "single":
            self.request_pool = engine.pool(
                self.model.max or DEFAULT_SPAWN, self.model.timeout, "chaussette-request"
            )
        self.plexer = Plexer(engine) if self.model.kind == "rplex" else None
        # free model: a connection's reader runs a request itself when it is the only one
        # on the connection; the watcher hands the reading over if bytes come meanwhile
        self.watcher: FdWatcher | None = None
        if self.multiplexing and self.model.kind == "free":
            self.watcher = engine.watcher()
        self.acceptor: Acceptor | None = None
        self.watchdog = False  # the task closing connections silent for --timeout runs
        self.closed = False

    # -- Server API --

    def start(self) -> None:
        if self.engine.name == "threads":
            log.info("%s", self.model_line())
        self.acceptor = self.engine.start_acceptor(self.listener.sock, self.conn_pool, self._serve)

    def model_line(self) -> str:
        """The request model in effect, for the log at start (threads)."""
        model = self.model
        kind = "FastCGI" if self.multiplexing else "SCGI"
        if model.kind == "single":
            what = "one request at a time per connection, in its thread"
            if self.multiplexing:
                what += " (no multiplexing)"
        elif model.kind == "rplex":
            what = f"apps called in at most {model.max} threads, responses written by one"
        else:
            what = f"at most {model.max} requests at once in threads kept {model.timeout:g} s"
        if self.multiplexing and model.kind != "single":
            what += "; multiplexing"
        return f"{kind} request model {model.kind}: {what}"

    def stop_accepting(self) -> None:
        if self.acceptor is not None:
            self.acceptor.stop()
            self.acceptor = None
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()
        self._sweep()

    def wait_idle(self, timeout: float) -> bool:
        """Until no request is in flight and, in a drain, no connection is left: one that
        was accepted but is not yet served (its task has not started, or its request has
        not come yet) may still bring a request, and closing it unanswered would fail that
        request at the peer (nginx answers 502 for it)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.draining:
                self._sweep()
            if self.requests <= 0 and (not self.draining or self.conn_pool.active() <= 0):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.engine.sleep(min(left, _POLL))

    def in_flight(self) -> int:
        return self.requests

    def wait_readable(self, fd: int, timeout: float | None) -> None:
        self.engine.wait_readable(fd, timeout)

    def close(self) -> None:
        self.closed = True
        if self.acceptor is not None:
            self.acceptor.stop()
            self.acceptor = None
        for conn in list(self.conns):
            conn.shut()
        self.conn_pool.close()
        if self.request_pool is not None:
            self.request_pool.close()
        if self.plexer is not None:
            self.plexer.stop()

    # -- connections --

    def _serve(self, sock: Any, addr: Any) -> None:
        try:
            if self.tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self.engine.set_timeouts(sock, self.timeout) and not self.watchdog:
                self.watchdog = True
                self.engine.spawn(self._watch_timeouts)
        except OSError:
            pass  # already reset: the first read says so
        conn = self.connection(self, sock, self.peer_name(addr))
        self.conns.add(conn)
        try:
            conn.run()
        finally:
            self.conns.discard(conn)

    def peer_name(self, addr: Any) -> str:
        if self.tcp and isinstance(addr, tuple):
            host, port = addr[:2]
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return self.unix_name

    def _watch_timeouts(self) -> None:
        """Engines whose sockets wait without a timeout: a connection whose read or write
        has waited ``--timeout`` seconds is expired (closed, which ends that wait). One
        look every quarter of the timeout (at most 1 s apart), instead of a timer per wait."""
        timeout = self.timeout
        assert timeout is not None
        period = min(max(timeout / 4, 0.01), 1.0)
        while not self.closed:
            self.engine.sleep(period)
            now = time.monotonic()
            for conn in list(self.conns):
                since = conn.read_since or conn.write_since
                if conn.read_since and conn.write_since:
                    since = min(conn.read_since, conn.write_since)
                if since and now - since >= timeout:
                    try:
                        conn.expire()
                    except Exception:
                        log.exception("unexpected error expiring a connection")

    def _sweep(self) -> None:
        fresh_expired = time.monotonic() - self.drain_started >= FRESH_GRACE
        for conn in list(self.conns):
            if conn.served or fresh_expired:
                conn.close_idle()

    # -- requests --

    def begin_request(self, bounded: bool = True) -> bool:
        """Count a request in; False when --max-reqs are in flight already."""
        with self.count_lock:
            if bounded and self.slots >= self.max_reqs:
                return False
            self.slots += 1
            self.requests += 1
            return True

    def free_slot(self) -> None:
        """The request is answered (its last bytes are about to be written): a new one may
        take its place under --max-reqs."""
        with self.count_lock:
            self.slots -= 1

    def end_request(self) -> None:
        """The request's last bytes are written: a drain no longer waits for it."""
        with self.count_lock:
            self.requests -= 1

    def respond(self, environ: dict[str, Any], stdin: BodyReader, sink: RequestSink) -> int:
        """Run the app (or the raw handler) for one request; returns the app status."""
        started = time.monotonic() if self.log_access else 0.0
        if self.raw:
            environ["wsgi.input"] = stdin
            return run_raw(self.app, RawRequest(environ, stdin, sink), sink)
        environ["wsgi.input"] = stdin
        environ["wsgi.errors"] = ErrorsTo(sink)
        response = BufferedResponse(self.app, environ, sink)
        response.run()
        if self.log_access:
            self.access_line(environ, response.status_code, response.body_bytes, started)
        return APP_FAILED if response.failed else APP_OK

    def respond_stepped(
        self,
        environ: dict[str, Any],
        stdin: BodyReader,
        sink: RequestSink,
        done: Callable[[int], None],
    ) -> None:
        """``rplex``: call the app here; iterate its response in the writer thread;
        ``done(app_status)`` is called when the response is complete, in either."""
        if self.raw or self.plexer is None:
            done(self.respond(environ, stdin, sink))
            return
        environ["wsgi.input"] = stdin
        environ["wsgi.errors"] = ErrorsTo(sink)
        response = SteppedResponse(self.app, environ, sink)
        started = time.monotonic() if self.log_access else 0.0

        def finished() -> None:
            if self.log_access:
                self.access_line(environ, response.status_code, response.body_bytes, started)
            done(APP_FAILED if response.failed else APP_OK)

        if response.call():
            self.plexer.add(response, finished)
        else:
            finished()

    @staticmethod
    def access_line(environ: dict[str, Any], status: int, length: int, started: float) -> None:
        access.info(
            '%s - - [%s] "%s %s %s" %s %s "%s" "%s" %.3f',
            environ.get("REMOTE_ADDR", "-"),
            time.strftime("%d/%b/%Y:%H:%M:%S %z"),
            environ.get("REQUEST_METHOD", "-"),
            environ.get("REQUEST_URI") or environ.get("PATH_INFO", ""),
            environ.get("SERVER_PROTOCOL", "-"),
            status or "-",
            length or "-",
            environ.get("HTTP_REFERER", "-"),
            environ.get("HTTP_USER_AGENT", "-"),
            time.monotonic() - started,
        )
