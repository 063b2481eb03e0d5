"""One SCGI connection (one request), written once for every engine.

The connection's task reads the netstring header block (holding no request slot: a
silent or trickling peer costs a connection, bounded by ``--max-conns``, not one of the
``--threads``/``--spawn`` slots), then takes a slot and runs the app itself (``wsgi.input``
reads the rest of the body from the connection as the app asks for it), writes the response
and closes: our side first, then the connection. Rules kept:

- the header block is bounded (``--max-params-size``); anything the core refuses closes the
  connection with one warning line naming the peer and the reason;
- a peer that connects and closes without a byte is not worth a line (a health check);
- a small response (headers and a list body) is one write; a streamed one is written chunk
  by chunk; a response the app broke off after it started is cut with a reset, so that the
  peer (nginx) sees it cut rather than complete;
- ``wsgi.errors`` goes to the log (SCGI has no error stream).
"""

from __future__ import annotations

import logging
import socket
import struct
from time import monotonic
from typing import TYPE_CHECKING, Any

from chaussette.drivers.environ import make_environ
from chaussette.drivers.server import LINGER, pending_bytes, send_all
from chaussette.drivers.stdin import StdinBuffer
from chaussette.protocols import scgi as core
from chaussette.protocols.cgi import encode_head
from chaussette.protocols.errors import RemoteProtocolError
from chaussette.wsgi import BodyReader

if TYPE_CHECKING:
    from chaussette.drivers.server import ProtocolServer

log = logging.getLogger("chaussette")

RECV_SIZE = 65536
LINGER_BUDGET = 1 << 20


class SCGIConnection:
    """One connection, one request; also the sink of its response."""

    def __init__(self, server: ProtocolServer, sock: Any, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.recv = server.engine.receiver(sock)
        self.peer = peer
        self.core = core.ServerConnection(max_params_size=server.settings.max_params_size)
        self.stdin = StdinBuffer(None, server.timeout, pump=self._pump)
        self.params: dict[str, str] | None = None
        self.body_done = False
        self.pending: list[bytes] = []
        self.gone: str | None = None
        self.cut = False
        self.served = False  # bytes have come
        self.closing = False
        self.in_request = False
        self.lock = server.engine.core_lock()
        self.read_since = 0.0  # the server's watchdog clock (engines without socket timeouts)
        self.write_since = 0.0

    # -- the connection task --

    def run(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("unexpected error on the SCGI connection from %s", self.peer)
            self.cut = True
        finally:
            self._close()

    def _serve(self) -> None:
        while self.params is None:
            data = self._recv()
            if data is None or (not data and not self.served):
                return  # reset, timed out, closed at once, or closed by a drain
            with self.lock:
                if self.closing:
                    return
                self.served = True
            if not self._receive(data):
                return
        self.in_request = True
        server = self.server
        server.begin_request(bounded=False)
        pool = server.request_pool
        if pool is not None:  # the head is complete: now take a request slot
            pool.acquire()
        try:
            environ = make_environ(self.params, server.base)
            stdin = BodyReader(self.stdin.read_some)
            if server.model.kind == "rplex":
                done = server.engine.flag()
                server.respond_stepped(environ, stdin, self, lambda status: done.set())
                done.wait()
            else:
                server.respond(environ, stdin, self)
            if not self.cut and not self.gone:
                try:
                    self.flush()
                except OSError:
                    pass
        finally:
            if pool is not None:
                pool.release()
            self.stdin.close()
            server.free_slot()
            server.end_request()

    def _recv(self) -> bytes | None:
        self.read_since = monotonic()
        try:
            return self.recv(RECV_SIZE)
        except OSError as exc:
            if not self.closing:
                log.debug("SCGI connection from %s: %s", self.peer, exc)
            return None
        finally:
            self.read_since = 0.0

    def _receive(self, data: bytes) -> bool:
        try:
            events = self.core.receive_data(data)
        except RemoteProtocolError as exc:
            if not self.closing:
                log.warning("SCGI peer %s: %s; connection closed", self.peer, exc)
            self.stdin.fail(f"bad request body: {exc}", logged=True)  # no second line
            self.cut = True
            return False
        for event in events:
            if type(event) is core.BodyData:
                self.stdin.feed(event.data)
            elif type(event) is core.Request:
                self.params = event.params
            elif type(event) is core.BodyEnd:
                self.body_done = True
                self.stdin.end()
        return True

    def _pump(self) -> None:
        """The app wants body bytes: read the connection once."""
        data = self._recv()
        if data is None:
            self.stdin.fail("reading the request body failed (timed out or reset)")
        else:
            self._receive(data)

    def _close(self) -> None:
        sock = self.sock
        try:
            if self.cut and self.in_request:
                # a reset, not a FIN: the peer must not take the response as complete
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.in_request and not self.closing:
                sock.shutdown(socket.SHUT_WR)
                if not self.body_done:  # unread body: read it away, or the peer gets a reset
                    sock.settimeout(LINGER)
                    budget = LINGER_BUDGET
                    while budget > 0:
                        data = sock.recv(RECV_SIZE)
                        if not data:
                            break
                        budget -= len(data)
        except OSError:
            pass
        finally:
            sock.close()

    # -- drain --

    def close_idle(self) -> bool:
        """Close the connection if its request has not begun to arrive."""
        with self.lock:
            if self.served or self.closing or pending_bytes(self.sock):
                return False
            self.closing = True
        self.shut()
        return True

    def shut(self) -> None:
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def expire(self) -> None:
        """From the server's watchdog: a read or a write waited for --timeout."""
        log.debug("SCGI connection from %s: timed out (--timeout); closed", self.peer)
        self.shut()

    # -- the sink --

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.pending.append(encode_head(status, headers) + body)

    def send_body(self, data: bytes) -> None:
        self.pending.append(data)

    def send_file(self, file: Any, count: int | None) -> int | None:
        return None

    def finish(self) -> None:
        return

    def abort(self) -> None:
        self.cut = True

    def flush(self) -> None:
        if self.gone:
            raise ConnectionAbortedError(self.gone)
        pending = self.pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.write_since = monotonic()
            try:
                send_all(self.sock, data)
            finally:
                self.write_since = 0.0

    def raw(self, data: bytes) -> None:
        if data:
            self.pending.append(data)

    def stderr(self, data: bytes) -> None:
        return  # SCGI has no error stream: wsgi.errors reaches the log only
