"""One FastCGI connection, written once for every engine.

The connection's task reads, feeds the core (``chaussette.protocols.fastcgi``) and acts on
its events; each request runs in a task of its own and writes its records under the
connection's write lock. In the ``single`` model, and in the ``free`` model for a request
alone on its connection when the engine has a descriptor watcher, the reader runs the
request itself (no handoff); with the watcher standing in, bytes that come meanwhile make a
new task take the reading over. Rules kept:

- management records and refusals the core answers itself go out as soon as it has them;
- BEGIN_REQUEST beyond ``--max-reqs`` in flight (over all connections) gets
  FCGI_OVERLOADED at once;
- the app starts when PARAMS is complete; STDIN feeds its ``wsgi.input`` as it arrives.
  Unread body bytes are bounded per request and per connection (``stdin.BodyBudget``);
  over a bound the connection is not read until an app reads (FastCGI has no per-request
  flow control, so other requests of the same connection wait too), except while an app
  waits for its own body (up to a hard cap);
- a body shorter than CONTENT_LENGTH: one warning line; an app reading past its end gets
  BodyTruncated and its response is cut (as below);
- ABORT_REQUEST: the app's next write fails, its iterable is closed, END_REQUEST says
  app status 2. The peer closing: the same for every request of the connection;
- END_REQUEST with app status 0, or 1 when the app failed; a response the app broke off
  after it started (an error mid-body, a short Content-Length) is cut: the connection is
  closed without END_REQUEST when that request is its only one (the peer sees it), else
  ends with app status 1;
- KEEP_CONN=0: the connection closes after that END_REQUEST (our side first, then what the
  peer still sends is read and dropped for a moment so that it does not get a reset);
- anything the core refuses (RemoteProtocolError): the connection closes, one warning line
  names the peer and the reason, requests in flight are abandoned.

Locks: ``core_lock`` around every use of the core that changes its state (the reader's
``receive_data``, a request's ``end_request``) and around the request table; ``wlock``
around each write. Under greenlets ``core_lock`` is a no-op.
"""

from __future__ import annotations

import logging
import socket
from time import monotonic
from typing import TYPE_CHECKING, Any

from chaussette.drivers.environ import make_environ
from chaussette.drivers.server import (
    APP_ABORTED,
    APP_FAILED,
    LINGER,
    pending_bytes,
    send_all,
)
from chaussette.drivers.stdin import BodyBudget, StdinBuffer
from chaussette.protocols import fastcgi as core
from chaussette.protocols.cgi import encode_head
from chaussette.protocols.errors import RemoteProtocolError
from chaussette.wsgi import BodyReader

if TYPE_CHECKING:
    from chaussette.drivers.server import ProtocolServer

log = logging.getLogger("chaussette")

RECV_SIZE = 65536
LINGER_BUDGET = 1 << 20  # bytes read and dropped after we closed our side


class FCGIRequest:
    """One request of a connection; also the sink its response writes through."""

    __slots__ = (
        "aborted",
        "conn",
        "cut",
        "environ",
        "gone",
        "id",
        "keep_conn",
        "pending",
        "running",
        "stdin",
    )

    def __init__(self, conn: FastCGIConnection, request_id: int, keep_conn: bool) -> None:
        self.conn = conn
        self.id = request_id
        self.keep_conn = keep_conn
        self.pending: list[bytes] = []
        self.gone: str | None = None  # why nothing more can be written
        self.aborted = False
        self.cut = False
        self.running = False  # handed to a task
        self.environ: dict[str, Any] | None = None
        self.stdin = conn.new_stdin()

    # -- the sink --

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.gone:
            raise ConnectionAbortedError(self.gone)
        self.pending.append(
            self.conn.core.send_stdout(self.id, encode_head(status, headers) + body)
        )

    def send_body(self, data: bytes) -> None:
        if self.gone:
            raise ConnectionAbortedError(self.gone)
        self.pending.append(self.conn.core.send_stdout(self.id, data))

    def send_file(self, file: Any, count: int | None) -> int | None:
        return None  # read and framed in records like any body

    def finish(self) -> None:
        return  # END_REQUEST goes out when the request task ends (after close())

    def abort(self) -> None:
        self.cut = True

    def flush(self) -> None:
        if self.gone:
            raise ConnectionAbortedError(self.gone)
        pending = self.pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.conn.write(data)

    def raw(self, data: bytes) -> None:
        if self.gone:
            raise ConnectionAbortedError(self.gone)
        if data:
            self.pending.append(self.conn.core.send_stdout(self.id, data))

    def stderr(self, data: bytes) -> None:
        if data and not self.gone:
            self.pending.append(self.conn.core.send_stderr(self.id, data))

    def fail(self, reason: str) -> None:
        """The peer aborted or went away: stop writing, fail reads."""
        if self.gone is None:
            self.gone = reason
        self.pending.clear()
        self.stdin.fail(reason)


class FastCGIConnection:
    def __init__(self, server: ProtocolServer, sock: Any, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.recv = server.engine.receiver(sock)
        self.peer = peer
        engine = server.engine
        settings = server.settings
        self.single = server.model.kind == "single"
        self.core = core.ServerConnection(
            max_conns=settings.max_conns,
            max_reqs=server.max_reqs,
            mpxs_conns=not self.single,
            max_params_size=settings.max_params_size,
        )
        self.core_lock = engine.core_lock()
        self.wlock = engine.lock()
        self.flag = engine.flag
        self.requests: dict[int, FCGIRequest] = {}
        self.served = False  # bytes have come: it is not a fresh connection any more
        self.closing = False  # we are closing it: errors from now on are expected
        self.dead = False  # the core is unusable (it raised, or the peer closed)
        self.refs = 1  # the reader + request tasks: the last one closes the socket
        self.inline: FCGIRequest | None = None  # the request the reader runs next itself
        self.watched = False  # the watcher reads for us while our reader runs a request
        self.watch_token: Any = None  # the watcher's last token, for it to recycle
        self.quit = False  # the reader stops: nothing more will come
        self.refusals = b""  # OVERLOADED answers waiting to be written
        self.lingered = 0  # bytes dropped after we closed our side
        self.read_since = 0.0  # the server's watchdog clock (engines without socket timeouts)
        self.write_since = 0.0
        # unread body bytes over all the requests (none in ``single``: the app reads the
        # connection itself), and the request whose own buffer the last batch filled
        self.budget = None if self.single else BodyBudget(engine.flag, engine.core_lock())
        self.full: StdinBuffer | None = None

    # -- the reader task --

    def run(self) -> None:
        """The reader: from the start, or taken over from a thread running an app."""
        lost = True
        try:
            lost = self._read_loop()
        except Exception:
            log.exception("unexpected error on the FastCGI connection from %s", self.peer)
        finally:
            if lost:
                self._lost("the peer closed the connection")
            self._unref()

    def _read_loop(self) -> bool:
        """Read and act until the connection ends (True), or until the reading moved to
        another thread while this one ran a request (False)."""
        budget = self.budget
        while True:
            if (
                budget is not None
                and budget.blocked(self.full)
                and not budget.wait(self.full, self.server.timeout)
            ):
                log.warning(
                    "FastCGI peer %s: %d body bytes left unread by the apps for %s s; "
                    "connection closed",
                    self.peer,
                    budget.unread,
                    self.server.timeout,
                )
                return True
            self.full = None
            data = self._recv()
            if data is None:
                return True
            if not self._receive(data) or not data:
                return True
            request, self.inline = self.inline, None
            if request is None or request.id not in self.requests:
                continue  # none, or aborted in the same batch (and ended)
            if self.single:
                self._serve(request)
            elif len(self.requests) > 1:  # another began meanwhile: run them side by side
                self._dispatch(request)
            elif not self._serve_watched(request):
                return False
            if self.quit:
                return True

    def takeover(self) -> None:
        """From the watcher: bytes came while this connection's reader runs an app."""
        with self.core_lock:
            if not self.watched:
                return
            self.watched = False
            self.refs += 1
        self.server.engine.spawn_reader(self.run)

    def _serve_watched(self, request: FCGIRequest) -> bool:
        """Run the only request of the connection in the reader's own thread (no handoff),
        the watcher standing in for the reader meanwhile; False if it took over."""
        pool = self.server.request_pool
        watcher = self.server.watcher
        assert pool is not None and watcher is not None
        fd = self.sock.fileno()
        pool.acquire()  # the request bound still holds: at the bound, no more reading
        try:
            request.running = True
            with self.core_lock:
                self.watched = True
            token = self.watch_token = watcher.watch(fd, self.takeover, self.watch_token)
            request.stdin.starve = self.takeover  # the app waits for its body: read it
            status = APP_FAILED
            try:
                status = self._respond(request)
            finally:
                with self.core_lock:
                    kept, self.watched = self.watched, False
                if kept:
                    watcher.unwatch(token)
                self._end(request, status, inline=kept)
        finally:
            pool.release()
        return kept

    def _recv(self) -> bytes | None:
        self.read_since = monotonic()
        try:
            return self.recv(RECV_SIZE)
        except OSError as exc:  # reset, timed out (idle for --timeout), shut by us
            if not self.closing:
                log.debug("FastCGI connection from %s: %s", self.peer, exc)
            return None
        finally:
            self.read_since = 0.0

    def _receive(self, data: bytes) -> bool:
        """Feed the core and act on its events; False when the connection must end."""
        with self.core_lock:
            if self.closing:
                return self._linger(data)
            try:
                events = self.core.receive_data(data)
            except RemoteProtocolError as exc:
                self.dead = True
                log.warning("FastCGI peer %s: %s; connection closed", self.peer, exc)
                return False
            if not data:
                self.dead = True
            self.served = True
            refused = False
            for event in events:
                if type(event) is core.RequestStarted:
                    refused |= not self._begin(event)
            out = self.core.data_to_send()
            if refused:
                out += self.refusals
                self.refusals = b""
            close = refused and self.core.should_close
            if close:
                self.closing = True
        if out:
            self.write_quietly(out)
        if close:
            self._close_our_side()
        for event in events:
            if type(event) is core.StdinData:
                request = self.requests.get(event.request_id)
                if request is not None and request.stdin.feed(event.data):
                    self.full = request.stdin  # the reader waits before its next read
            elif type(event) is core.Params:
                request = self.requests.get(event.request_id)
                if request is not None and request.environ is None:
                    self._start(request, event.params)
            elif type(event) is core.StdinEnd:
                request = self.requests.get(event.request_id)
                if request is not None and not request.stdin.end():
                    log.warning(
                        "FastCGI peer %s: request %d: %s",
                        self.peer,
                        request.id,
                        request.stdin.error,
                    )
            elif type(event) is core.Aborted:
                self._abort(event.request_id)
        return True

    def _linger(self, data: bytes) -> bool:
        """After we closed our side: drop what comes, for a bounded time and size."""
        if not data or self.dead:
            return False
        self.lingered += len(data)
        return self.lingered < LINGER_BUDGET

    def _begin(self, event: Any) -> bool:
        """BEGIN_REQUEST (under core_lock): count it in, or answer OVERLOADED (False)."""
        request_id = event.request_id
        if not self.server.begin_request():
            self.refusals += self.core.end_request(request_id, 0, core.OVERLOADED)
            log.info(
                "FastCGI peer %s: request %d refused, --max-reqs %d in flight (OVERLOADED)",
                self.peer,
                request_id,
                self.server.max_reqs,
            )
            return False
        self.requests[request_id] = FCGIRequest(self, request_id, event.keep_conn)
        return True

    def _start(self, request: FCGIRequest, params: dict[str, str]) -> None:
        """PARAMS is complete: start the app (after this batch of events, when the reader
        runs it itself)."""
        environ = request.environ = make_environ(params, self.server.base)
        length = environ.get("CONTENT_LENGTH")
        if length:
            request.stdin.expected = int(length)  # a shorter body is cut (see ``_end``)
        if self.single or (self.inline is None and self.server.watcher is not None):
            self.inline = request
            return
        if self.inline is not None:  # two in one batch: both in tasks, in their order
            first, self.inline = self.inline, None
            if first.id in self.requests:
                self._dispatch(first)
        self._dispatch(request)

    def _dispatch(self, request: FCGIRequest) -> None:
        """Run the request in a task of the request pool."""
        request.running = True
        with self.core_lock:
            self.refs += 1
        pool = self.server.request_pool
        assert pool is not None
        pool.submit(self._serve_pooled, request)  # blocks at the bound: no reading meanwhile

    def _abort(self, request_id: int) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        request.aborted = True
        request.fail("the peer aborted the request (ABORT_REQUEST)")
        if not request.running:  # its app never started: end it now
            self._end(request, APP_ABORTED)

    def _lost(self, reason: str) -> None:
        """The reader ended: abandon every request."""
        with self.core_lock:
            self.dead = True
            self.closing = True
            requests = list(self.requests.values())
        for request in requests:
            request.fail(reason)
            if not request.running:
                self._end(request, APP_ABORTED)

    # -- the request task --

    def new_stdin(self) -> StdinBuffer:
        timeout = self.server.timeout
        if self.single:
            return StdinBuffer(None, timeout, pump=self._pump)
        return StdinBuffer(self.flag, timeout, budget=self.budget)

    def _pump(self) -> None:
        """single model: the app wants body bytes: read the connection once."""
        data = self._recv()
        if data is None or not self._receive(data) or not data:
            self._lost("the peer closed the connection")

    def _serve(self, request: FCGIRequest) -> None:
        """single model: run the request in the reader's thread."""
        request.running = True
        self._end(request, self._respond(request), inline=True)

    def _serve_pooled(self, request: FCGIRequest) -> None:
        if self.server.model.kind == "rplex":
            environ = request.environ
            assert environ is not None

            def done(status: int) -> None:
                try:
                    self._end(request, status)
                finally:
                    self._unref()

            self.server.respond_stepped(environ, BodyReader(request.stdin.read_some), request, done)
            return
        try:
            status = APP_FAILED
            status = self._respond(request)
        finally:
            try:
                self._end(request, status)
            finally:
                self._unref()

    def _respond(self, request: FCGIRequest) -> int:
        """Run the app; its application status."""
        environ = request.environ
        assert environ is not None
        return self.server.respond(environ, BodyReader(request.stdin.read_some), request)

    def _end(self, request: FCGIRequest, status: int, inline: bool = False) -> None:
        """The request is over: END_REQUEST (or the cut), then count it out. ``inline``:
        called by the connection's reader, which can simply stop reading."""
        request.stdin.close()
        if request.stdin.overread:  # the app read past the end of a short body
            request.cut = True
        request.environ = None  # its wsgi.errors refers to the request: no cycle for the GC
        if request.cut:
            status = APP_FAILED
        elif request.aborted:
            status = APP_ABORTED
        close_idle = False
        with self.core_lock:
            self.requests.pop(request.id, None)
            alone = not self.requests
            if request.cut and alone and not request.gone:
                self.closing = True  # no END_REQUEST: the peer sees the response cut
                end = None
            elif self.dead:
                end = None
            else:
                end = self.core.end_request(request.id, status)
            should_close = not self.dead and self.core.should_close
            if should_close:
                self.closing = True
            elif self.server.draining and alone and not self.closing:
                close_idle = True
        self.server.free_slot()  # before the peer can see the end and send the next one
        try:
            if end is None:
                if request.cut and not request.gone:
                    self._shutdown(socket.SHUT_RDWR)
                return
            pending = request.pending
            if request.gone:
                data = end
            else:
                pending.append(end)
                data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.write_quietly(data)
            if should_close:
                if inline and alone and request.stdin.eof and not pending_bytes(self.sock):
                    self.quit = True  # the peer sends nothing more: just close
                else:
                    self._close_our_side()
            elif close_idle:
                self.close_idle()
        finally:
            self.server.end_request()  # after the write: a drain must not close it first

    # -- writing and closing --

    def write(self, data: bytes) -> None:
        with self.wlock:
            self.write_since = monotonic()
            try:
                send_all(self.sock, data)
            finally:
                self.write_since = 0.0

    def write_quietly(self, data: bytes) -> None:
        try:
            self.write(data)
        except OSError as exc:
            if not self.closing:
                log.debug("FastCGI connection from %s: %s", self.peer, exc)

    def _close_our_side(self) -> None:
        """After the last END_REQUEST (KEEP_CONN=0): FIN now, read what is left."""
        self.closing = True
        try:
            self.sock.settimeout(LINGER)
        except OSError:
            pass
        self._shutdown(socket.SHUT_WR)

    def close_idle(self) -> bool:
        """Close the connection if no request is in flight and no byte is waiting."""
        with self.core_lock:
            if self.requests or self.closing or pending_bytes(self.sock):
                return False
            self.closing = True
        self._shutdown(socket.SHUT_RDWR)  # wakes the reader: it ends
        return True

    def shut(self) -> None:
        with self.core_lock:
            self.closing = True
        if self.budget is not None:
            self.budget.stop()  # a reader waiting for the apps to read: let it see the end
        self._shutdown(socket.SHUT_RDWR)

    def expire(self) -> None:
        """From the server's watchdog: a read or a write waited for --timeout."""
        log.debug("FastCGI connection from %s: timed out (--timeout); closed", self.peer)
        self.shut()

    def _shutdown(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def _unref(self) -> None:
        with self.core_lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            try:
                self.sock.close()
            except OSError:
                pass
