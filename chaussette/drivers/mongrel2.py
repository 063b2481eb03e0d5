"""A Mongrel2 handler: requests over ZeroMQ, on OS threads (gevent and eventlet: m2gevent.py,
m2eventlet.py), answered by chaussette's WSGI host.

Mongrel2 binds two sockets per handler; we connect to both. It PUSHes each request to one
of the handlers connected to ``send_spec`` (we PULL) and SUBscribes to what handlers publish
on ``recv_spec`` (we publish with an XPUB socket: it also tells us when Mongrel2 subscribes,
which is when we say "connected" and before which a reply would be dropped). The message
format is ``chaussette.protocols.mongrel2``'s; this module does the I/O around it:

- Tasks (``Crew``) take turns receiving, and the task that receives a request runs it:
  one task while requests are quick, more when all have been busy for ``HELP_DELAY``, at
  most ``--threads`` or ``--spawn`` (at the bound nobody receives, so Mongrel2 holds the
  requests or gives them to another handler process). Requests of one client connection
  run one after the other, in the order they came (at most ``MAX_PIPELINE`` waiting;
  beyond, the connection is closed). The sockets are pyzmq's own on every engine: OS
  threads block in ZeroMQ's calls; gevent and eventlet make them non-blocking and wait for
  ZeroMQ's descriptor in their hub (``zmq.green`` costs twice as much per message).
- Replies: ZeroMQ sockets are not thread-safe, so the publisher is used under a lock by
  whichever task replies (the lock is the "full memory barrier" ZeroMQ asks for to move a
  socket between threads). It never drops a reply at its high-water mark
  (``XPUB_NODROP``): a task waits, up to ``--timeout``, then takes the client as gone.
  Replies are never queued for a Mongrel2 that is not connected (``IMMEDIATE``), and one
  for a request of a Mongrel2 that went away since is dropped (``Publisher.epoch``): the
  Mongrel2 that comes back has new connections under the same ids.
- A response goes out as its status line and headers for the client's HTTP version, then
  chunked when the app gave no Content-Length on HTTP/1.1 (on HTTP/1.0, the connection is
  closed to end it); a list body leaves in one message, a streamed one a message per chunk
  as the app yields it. Mongrel2 never closes a connection by itself: we send it the
  empty reply that closes it after a response HTTP says ends the connection, after a
  response the app broke off (so the client sees it cut) and after a 400.
- A disconnect message marks the connection gone: its response stops at the next chunk
  (the app's iterable is closed), an upload read fails, its queued requests are dropped.
- Async uploads (``m2upload.py``): the request runs as soon as the upload-start message
  comes, reading ``wsgi.input`` from the spool file while Mongrel2 writes it. Mongrel2
  spools only a body whose Content-Length exceeds its ``limits.content_length``, and then
  sets the upload headers itself: upload headers on any other request are a client's. A
  message with upload headers Mongrel2 cannot have produced, or a path outside the upload
  directory, is answered 400 and the connection closed; nothing outside that directory is
  ever read or deleted, and a spool file only for a request Mongrel2 spooled. A genuine
  done message for an upload this process did not start (PUSH may give the two messages
  to different handler processes) is ignored.
- A drain (SIGTERM, SIGHUP) loses none of the requests Mongrel2 has sent us (``PullDrain``):
  we serve until our queue and the socket's are empty (what Mongrel2 queued for us while we
  were busy comes through meanwhile), then half-close our connection to send_spec; Mongrel2
  stops giving us requests, and everything it wrote before reaches us; when it has closed
  its side we serve the rest of our queue and close. The requests in flight finish.
  Mongrel2 gives new requests to the other handler processes, or holds them until a handler
  connects. PUSH has no acknowledgement, and one loss stays out of our reach, inside
  Mongrel2: a request it is handing to us at the very moment we leave is dropped there
  (its I/O thread drops what it had not written to us yet when it reads our FIN, and its
  sending thread learns that we left only at its next look: libzmq looks before each
  message, except in a continuous stream, then at most once per 1-2 ms). That client waits
  for its own timeout. So it happens only when Mongrel2 sends requests to this handler's
  processes less than a couple of milliseconds apart. Measured at ~1000 requests a second
  over two processes: 5 requests lost in 90 restarts of one process (18 when the drain
  closed as soon as its queue was empty); see docs/mongrel2.rst.
- Credit mode (``--m2-dispatcher``, ``Credit``) closes that gap: requests come from
  chaussette-dispatcher ``--credit`` over a DEALER socket, only as many as this process
  asked for (its free tasks); a drain says goodbye, and once the dispatcher's answer has
  come nothing more can: no request is in flight to a process that left. A dispatcher that
  restarts is asked again for requests as soon as ZeroMQ has connected to it again.
"""

from __future__ import annotations

import _socket
import fcntl
import io
import logging
import os
import posix
import select
import socket
import struct
import termios
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from chaussette.backends.base import Server
from chaussette.drivers.engine import Engine, Flag, ThreadEngine
from chaussette.drivers.environ import SERVER_SOFTWARE, base_environ
from chaussette.drivers.m2config import Endpoints, UploadPlace, load_handler, parse_zeromq
from chaussette.drivers.m2upload import (
    SpoolFile,
    UploadBody,
    UploadRefused,
    resolve,
    spooled_length,
)
from chaussette.drivers.response import BufferedResponse
from chaussette.drivers.server import DEFAULT_SPAWN, IDLE_TIMEOUT, ProtocolServer
from chaussette.errors import UsageError
from chaussette.protocols import mongrel2 as core
from chaussette.protocols.errors import RemoteProtocolError
from chaussette.wsgi import BodyReader, ErrorStream

if TYPE_CHECKING:
    from chaussette.settings import Settings
    from chaussette.sockets import Listener
    from chaussette.wsgi import WSGIApp

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

HELP_DELAY = 0.005  # seconds every thread may be busy before another one is added
SHRINK_AFTER = 2.0  # seconds without that before one task beyond the first leaves
TICK = 0.1  # seconds the receiver waits before it looks at its flags and subscriptions
CHECK_EVERY = 256  # messages between two looks at subscriptions under load
MAX_PIPELINE = 32  # requests of one client connection waiting behind the one running
RCV_HWM = 64  # requests queued in this process before Mongrel2 holds them (or gives
# them to another handler process)
SND_HWM = 1000  # replies queued for Mongrel2 before a replying task waits
# seconds between two looks at the subscriptions when replying: a look costs a lock and a
# getsockopt (some µs); a Mongrel2 that went away and came back is seen in time anyway,
# since ZeroMQ reconnects after 100 ms at the earliest (ZMQ_RECONNECT_IVL)
SUBSCRIPTION_CHECK = 0.001
SUBSCRIBE_WAIT = 5.0  # seconds a first reply waits for Mongrel2 to subscribe
MAX_CLOSED = 4096  # connections remembered as closed by us
LINGER_MS = 2000  # at close, how long queued replies may still take to leave
DRAIN_POLL = 0.01  # seconds between two looks at the drain's progress
# the share of --graceful-timeout a drain may spend serving what Mongrel2 had queued for
# us (until our queue is found empty) before it half-closes the connection anyway
CATCH_UP_SHARE = 0.5
# seconds a drain waits for Mongrel2 to close its end of our request connection (it does
# so as soon as it reads our FIN); after that the connection is closed anyway
DISCONNECT_WAIT = 5.0
HANDSHAKE_POLL = 0.005  # seconds between two tries to send credit while ZeroMQ connects


def batch_io_thread(zmq: Any, ctx: Any) -> None:
    """ZeroMQ's I/O thread gets SCHED_BATCH: woken by a message, it does not preempt the
    thread that runs requests, and takes what that thread sent in one go once it waits
    (or its time slice ends). Where both share one CPU (a container limited to one, or a
    busy machine) each message otherwise costs two context switches: bench/mongrel2.py,
    the handler on one core, went from 0.78x to 0.88-0.91x the requests a second of a
    raw pyzmq handler. On an idle core the I/O thread runs at once, as before. To call
    before the context's first socket."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(zmq, "THREAD_SCHED_POLICY"):
        return
    try:
        ctx.set(zmq.THREAD_SCHED_POLICY, policy)
    except zmq.ZMQError as exc:
        log.debug("ZeroMQ's I/O thread keeps its scheduling policy: %s", exc)


Job = tuple["M2Conn", core.Request, "str | None"]  # a request to run, or to refuse (400)


class M2Conn:
    """A client connection of Mongrel2's with a request here (running or queued)."""

    __slots__ = ("backlog", "closed", "epoch", "gone", "key", "prefix", "upload", "wake")

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.epoch = 0  # the Mongrel2 it came from (Publisher.epoch)
        self.prefix = core.reply_prefix(key[0], key[1])  # of each reply to it
        self.backlog: deque[tuple[core.Request, str | None]] = deque()
        self.gone = False  # Mongrel2 said the client went away
        self.closed = False  # we asked Mongrel2 to close it
        self.upload: UploadBody | None = None
        self.wake: Flag | None = None


class Publisher:
    """The XPUB socket replies leave by, used under a lock by any task."""

    def __init__(
        self, server: Mongrel2Server, spec: str, identity: bytes | None, timeout: float | None
    ) -> None:
        zmq = self.zmq = server.zmq
        self.server = server
        self.spec = spec
        self.timeout = timeout
        self.lock = server.engine.lock()
        sock = self.sock = server.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        # replies never wait for a Mongrel2 to come (back): one that restarts has new
        # connections under the old ids, and stale replies must not reach them; with this,
        # a lost connection also unsubscribes, which is how we see Mongrel2 go away
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, SND_HWM)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        if timeout and server.blocking:
            sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(spec)
        self.flags = 0 if server.blocking else zmq.NOBLOCK
        self.subscribed = 0  # topics Mongrel2 subscribed to (it subscribes to all: one)
        # counts the times Mongrel2 went away: a reply to a request received before is
        # dropped, never given to the Mongrel2 that came back (its connection ids are new)
        self.epoch = 0
        self.checked = 0.0  # when the subscriptions were last read (time.monotonic)
        self.warned = False
        self.closed = False

    def epoch_now(self) -> int:
        """The epoch a request received now belongs to."""
        if self.subscribed and time.monotonic() - self.checked < SUBSCRIPTION_CHECK:
            return self.epoch
        with self.lock:
            if not self.closed:
                self._look()
            return self.epoch

    def _look(self) -> None:
        """Under the lock: take note of what Mongrel2 (un)subscribed, if anything."""
        self.checked = time.monotonic()
        if self.sock.getsockopt(self.zmq.EVENTS) & self.zmq.POLLIN:
            self._read_subscriptions()

    def send(self, frame: bytes, epoch: int) -> None:
        """Publish one reply to a request of ``epoch``; ConnectionError when it cannot
        leave."""
        with self.lock:
            if self.closed:
                raise ConnectionAbortedError("the handler is closing")
            if not self.subscribed or time.monotonic() - self.checked >= SUBSCRIPTION_CHECK:
                self._look()
            if epoch != self.epoch:
                raise ConnectionAbortedError("Mongrel2 went away since the request came")
            if not self.subscribed:
                self._await_subscriber()
            try:
                self.sock.send(frame, self.flags, copy=len(frame) >= 65536)
            except self.zmq.Again:
                if self.server.blocking:
                    raise ConnectionError("Mongrel2 took no reply for --timeout") from None
                self._send_later(frame)
            except self.zmq.ZMQError as exc:
                raise ConnectionError(f"publishing to Mongrel2: {exc}") from None

    def _send_later(self, frame: bytes) -> None:
        """A cooperative engine at the high-water mark: wait for room, up to --timeout."""
        zmq = self.zmq
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ConnectionError("Mongrel2 took no reply for --timeout")
            self.server.wait_socket(self.sock, zmq.POLLOUT, TICK if left is None else left)
            try:
                self.sock.send(frame, zmq.NOBLOCK, copy=len(frame) >= 65536)
                return
            except zmq.Again:
                continue

    def check(self) -> None:
        """Take note of (un)subscriptions: Mongrel2 connecting or going away."""
        with self.lock:
            if not self.closed:
                self._read_subscriptions()

    def _read_subscriptions(self) -> None:
        before = self.subscribed
        while True:
            try:
                msg = self.sock.recv(self.zmq.NOBLOCK)
            except self.zmq.Again:
                break
            if msg[:1] == b"\x01":
                self.subscribed += 1
            elif msg[:1] == b"\x00" and self.subscribed:
                self.subscribed -= 1
                if not self.subscribed:
                    self.epoch += 1
        if self.subscribed and not before:
            self.warned = False
            log.info("connected to Mongrel2: replies to %s", self.spec)
        elif before and not self.subscribed:
            log.warning(
                "Mongrel2 at %s went away (stopped or restarting); waiting for it", self.spec
            )

    def _await_subscriber(self) -> None:
        """Right after a (re)connection Mongrel2 may not have subscribed yet, and a reply
        published before would be dropped (ZeroMQ's slow joiner): wait for it, bounded."""
        deadline = time.monotonic() + SUBSCRIBE_WAIT
        while True:
            self._read_subscriptions()
            if self.subscribed:
                return
            if time.monotonic() >= deadline:
                if not self.warned:
                    self.warned = True
                    log.warning("Mongrel2 has not subscribed to %s: replies are dropped", self.spec)
                return
            self.server.engine.sleep(0.005)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.sock.close()


class Reply:
    """The sink of one response: HTTP/1.x bytes to Mongrel2, for one client connection."""

    __slots__ = (
        "bodyless",
        "chunked",
        "close",
        "conn",
        "head_only",
        "http11",
        "pending",
        "prefix",
        "publisher",
        "request",
        "server",
    )

    def __init__(self, server: Mongrel2Server, conn: M2Conn, request: core.Request) -> None:
        self.server = server
        self.publisher = server.publisher
        self.conn = conn
        self.request = request
        self.prefix = conn.prefix
        self.pending: list[bytes] = []
        self.http11 = request.headers.get("VERSION") == "HTTP/1.1"
        self.close = not core.keep_alive(request)
        self.head_only = request.headers.get("METHOD") == "HEAD"
        self.chunked = False
        self.bodyless = False

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        code = int(status[:3])
        self.bodyless = self.head_only or code < 200 or code in (204, 304)
        if not self.bodyless and not any(n.lower() == "content-length" for n, _ in headers):
            if self.http11:
                self.chunked = True
            else:
                self.close = True  # HTTP/1.0: the end of the connection ends the body
        self.pending.append(
            core.response_head(
                self.request, status, headers, chunked=self.chunked, close=self.close
            )
        )
        if body:
            self.send_body(body)

    def send_body(self, data: bytes) -> None:
        if not self.bodyless:
            self.pending.append(core.encode_chunk(data) if self.chunked else data)

    def send_file(self, file: Any, count: int | None) -> int | None:
        return None  # the response iterates the file wrapper instead

    def finish(self) -> None:
        if self.chunked:
            self.pending.append(core.LAST_CHUNK)
        self.flush()
        if self.close:
            self.close_connection()

    def abort(self) -> None:
        self.pending.clear()
        if not self.conn.gone:
            self.close_connection()

    def flush(self) -> None:
        if self.conn.gone:
            raise ConnectionAbortedError("the client went away (Mongrel2 disconnect)")
        pending = self.pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.publisher.send(self.prefix + data, self.conn.epoch)

    def close_connection(self) -> None:
        self.server.closing(self.conn)
        # an empty payload: Mongrel2 closes the connection
        self.publisher.send(self.prefix, self.conn.epoch)

    # the raw-handler side of a sink (the Mongrel2 handler has no --raw-handler)
    def raw(self, data: bytes) -> None:
        self.pending.append(data)

    def stderr(self, data: bytes) -> None:
        return


class PullDrain:
    """Leaving Mongrel2 without losing what it has already pushed to us.

    PUSH has no acknowledgement: a message Mongrel2 has handed to our connection is ours,
    and it is lost if that connection is closed before we read it -- in our queue, in
    either kernel's buffers, or in Mongrel2's own queue for our connection (which holds
    some when the buffers between us are full). ``zmq_disconnect`` and ``zmq_close`` drop
    our queue at once (ZeroMQ's documented behaviour, and measured). So:

    1. Catch up: serve until our queue is empty and the kernel holds no unread byte for our
       connection (bounded by half of --graceful-timeout, for a handler that never catches
       up): Mongrel2's queue for us has then flowed to us too.
    2. Half-close: ``shutdown(SHUT_WR)`` on the TCP (or unix) connection under our PULL
       socket (its descriptor comes from a socket monitor, checked to be a connection to
       send_spec before it is touched). Mongrel2 reads our FIN as the end of the
       connection, stops giving us requests and closes its side; every request it wrote
       before that still reaches us, then the end of the stream.
    3. ZeroMQ sees the connection lost and keeps our queue (it would connect again after
       100 ms, for a Mongrel2 that restarts): once the monitor says that every connection
       has ended, the queue is complete; we take it all at once and close the socket, and
       the crew serves what was in it. A connection made meanwhile is half-closed as soon
       as it is seen.

    What stays lost is inside Mongrel2: a request it is handing to our connection as it
    reads our FIN (its I/O thread drops what it had not written to us yet, and its sending
    thread keeps choosing our connection until its next look at such news: libzmq's
    ``zmq_send`` looks at most once per ~3 million CPU cycles in a continuous stream), and
    what Mongrel2 still queued for us if we never caught up.
    """

    def __init__(self, server: Mongrel2Server, pull: Any, monitor: Any) -> None:
        from zmq.utils.monitor import parse_monitor_message

        self.parse = parse_monitor_message
        self.server = server
        self.zmq = server.zmq
        self.pull = pull
        self.monitor = monitor
        self.live: set[int] = set()  # descriptors of our connections to send_spec
        self.catch_up_until = 0.0
        self.shutting = False
        self.started = 0.0

    def events(self) -> None:
        """Take note of the monitor's events (connected, disconnected)."""
        zmq = self.zmq
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            try:
                event = self.parse(frames)
            except Exception:  # a malformed event: ZeroMQ's, not a peer's
                continue
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_CONNECTED:
                self.live.add(fd)
                if self.shutting:
                    self._half_close(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.live.discard(fd)

    def start(self) -> None:
        """Half-close every connection to Mongrel2's send_spec."""
        self.events()
        self.shutting = True
        self.started = time.monotonic()
        for fd in list(self.live):
            self._half_close(fd)
        log.info(
            "leaving Mongrel2 (%s): no new request; serving those already sent",
            self.server.endpoints.send_spec,
        )

    def _half_close(self, fd: int) -> None:
        try:
            sock = _socket.socket(fileno=os.dup(fd))
        except OSError:
            self.live.discard(fd)
            return
        try:
            if not self._ours(sock):
                self.live.discard(fd)  # not (any more) our connection: leave it alone
                return
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.live.discard(fd)  # already gone: nothing to wait for
        finally:
            sock.close()  # our duplicate only: ZeroMQ still holds the connection

    def _ours(self, sock: Any) -> bool:
        """The descriptor is still a stream connection to send_spec (an event missed at
        the monitor's bound could leave a stale number, since reused)."""
        if sock.type != socket.SOCK_STREAM:
            return False
        peer = sock.getpeername()
        spec = self.server.endpoints.send_spec
        if spec.startswith("ipc://"):
            return bool(peer == spec[len("ipc://") :])
        port = spec.rpartition(":")[2]
        return isinstance(peer, tuple) and port.isdigit() and peer[1] == int(port)

    def unread(self) -> int:
        """Bytes the kernel holds for our connections, not yet read by ZeroMQ."""
        count = 0
        for fd in self.live:
            try:
                raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
            except OSError:
                continue
            count += struct.unpack("i", raw)[0]
        return count

    def done(self) -> bool:
        """Every connection has ended: whatever Mongrel2 sent us is in our queue."""
        self.events()
        if not self.live:
            return True
        if time.monotonic() - self.started >= DISCONNECT_WAIT:
            log.warning(
                "Mongrel2 did not close its end of %s in %g s: leaving anyway",
                self.server.endpoints.send_spec,
                DISCONNECT_WAIT,
            )
            return True
        return False

    def close(self) -> None:
        """Before the PULL socket is closed."""
        try:
            self.pull.disable_monitor()
        except self.zmq.ZMQError:
            pass
        self.monitor.close(linger=0)


class Credit:
    """Credit mode (``--m2-dispatcher``): requests come from chaussette-dispatcher, which
    gives this process one only when it asked for it (``READY n``: n more).

    Each connection to the dispatcher starts with ``READY`` for as many requests as this
    process can take (``--threads``/``--spawn``, less those it holds), then one more each
    time a request has finished, and at once for a message that took no task (a
    disconnect notice, an upload-done message, a request queued behind another of its
    connection). So the dispatcher never has more in flight to us than we can run, and the
    requests wait in the dispatcher, where any handler can take them. A drain says
    ``BYE``; the dispatcher answers ``BYE`` and sends nothing after it, so every request
    it gave us has come once its answer has: nothing is in flight to a process that left.

    A dispatcher that restarts knows nothing of us: ZeroMQ connects again, the socket
    monitor says so, and the new connection starts with its own ``READY``. Nothing is
    queued for a dispatcher that is not connected (``IMMEDIATE``), so it never gets
    credit twice.

    The DEALER socket is the receiving task's alone (ZeroMQ sockets are not thread-safe,
    and on gevent and eventlet a send from another task could take the wake-up the
    receiver waits for): a task that finishes a request counts the credit it owes and,
    when the receiver is waiting, wakes it through a pipe; the receiver sends the credit.
    """

    def __init__(self, server: Mongrel2Server, spec: str) -> None:
        zmq = self.zmq = server.zmq
        self.server = server
        self.spec = spec
        self.size: int = server.size
        self.lock = server.engine.core_lock()
        # under ``lock``: credit earned back and not sent yet; messages received whose
        # credit is not earned back yet; the receiver is waiting (wake it for credit)
        self.owed = 0
        self.held = 0
        self.waiting = False
        self.announce = False  # a new connection: tell it all we can take
        self.linked = False  # connected to the dispatcher
        self.connections = 0
        dealer = self.dealer = server.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)  # bounded by our credit, not by ZeroMQ
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # no credit queued for a dispatcher not there
        self.monitor = dealer.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        dealer.connect(spec)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller: Any = None
        if server.blocking:
            self.poller = zmq.Poller()
            self.poller.register(dealer, zmq.POLLIN)
            self.poller.register(self.monitor, zmq.POLLIN)
            self.poller.register(self.wake_r, zmq.POLLIN)
        self.fds = (dealer.getsockopt(zmq.FD), self.monitor.getsockopt(zmq.FD), self.wake_r)
        self.leaving = 0.0  # when we said BYE (time.monotonic)

    # -- any task --

    def owe(self) -> None:
        """The receiver, for a message that took no task: its credit goes back at once."""
        with self.lock:
            self.held -= 1
            self.owed += 1

    def returned(self) -> None:
        """Any task, after a request: its credit goes back; wake the receiver for it."""
        with self.lock:
            self.held -= 1
            self.owed += 1
            if self.waiting:
                self.waiting = False
                try:
                    posix.write(self.wake_w, b"!")  # os.write waits under eventlet
                except OSError:
                    pass  # closed: we are done

    # -- the receiver --

    def _events(self) -> None:
        zmq = self.zmq
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connections += 1
                self.linked = self.announce = True
                if self.connections > 1:
                    log.info("connected to the dispatcher again (%s)", self.spec)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.linked = False
                if not self.leaving:
                    log.warning("lost the dispatcher (%s): waiting for it", self.spec)

    def _grant(self) -> bool:
        """Send the credit we owe (all we can take, to a new connection); False when it
        could not go yet (ZeroMQ's handshake with the dispatcher is not over)."""
        if self.leaving:
            return True
        with self.lock:
            count = max(self.size - self.held, 0) if self.announce else self.owed
            if not count:
                return True
            self.owed = 0
        try:
            self.dealer.send(b"READY %d" % count, self.zmq.NOBLOCK)
        except self.zmq.Again:  # not connected (IMMEDIATE): again later
            with self.lock:
                self.owed += count
            return False
        if self.announce:
            self.announce = False
            log.info("ready for %d request(s) from the dispatcher (%s)", count, self.spec)
        return True

    def _take(self) -> list[bytes] | None:
        try:
            frames: list[bytes] = self.dealer.recv_multipart(self.zmq.NOBLOCK)
        except self.zmq.Again:
            return None
        with self.lock:
            self.held += 1
        return frames

    def recv(self, timeout: float) -> list[bytes] | None:
        """The next message's frames, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            sent = self._grant()
            frames = self._take()
            if frames is not None:
                return frames
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not sent and self.linked:
                self._wait(min(left, HANDSHAKE_POLL))  # the handshake is about to end
            else:
                with self.lock:
                    if self.owed and self.linked:
                        continue  # earned meanwhile: send it first
                    self.waiting = True
                self._wait(left)
                with self.lock:
                    self.waiting = False
            try:
                while posix.read(self.wake_r, 512):  # os.read waits under eventlet
                    pass
            except OSError:
                pass  # empty (BlockingIOError), or closed at the very end
            self._events()

    def _wait(self, timeout: float) -> None:
        if self.poller is not None:
            self.poller.poll(max(int(timeout * 1000), 1))
            return
        zmq = self.zmq
        for sock in (self.dealer, self.monitor):
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # edge-triggered descriptors
                return
        self.server.wait_fds(self.fds, timeout)

    def leave(self) -> None:
        self._grant()
        self.leaving = time.monotonic()
        try:
            self.dealer.send(b"BYE", self.zmq.NOBLOCK)
        except self.zmq.Again:
            log.warning("the dispatcher (%s) is not connected: leaving without goodbye", self.spec)
        log.info("leaving the dispatcher (%s): no new request; serving those given", self.spec)

    def close_receiver(self) -> None:
        """The receiver, at the end of the drain."""
        self.dealer.disable_monitor()
        self.monitor.close(linger=0)
        self.dealer.close(linger=0)

    def close(self) -> None:
        with self.lock:
            fds, self.wake_r, self.wake_w = (self.wake_r, self.wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class Crew:
    """Tasks taking turns at the receiving socket (leader/followers), each running the
    request it received itself: no handoff between a receiver and a worker.

    A task holds ``pull_lock`` while it receives (with OS threads the lock is also the
    memory barrier ZeroMQ asks for when a socket changes threads), lets it go once it has a
    request, and runs that request. One task is enough while requests are quick. The
    monitor adds a task when every task has been busy for ``HELP_DELAY`` (a slow app, or
    many requests at once), up to ``size`` (``--threads``, ``--spawn``): at that bound
    nobody receives, and Mongrel2 holds the requests (or gives them to another handler
    process). A task beyond the first leaves when no help was needed for ``SHRINK_AFTER``
    (one at a time), or when it finds nothing to do for ``IDLE_TIMEOUT``: under a load of
    quick requests one task serves best, since each handoff of the socket between tasks
    costs context switches (and GIL handoffs) that a request in a loop does not.
    """

    def __init__(self, server: Mongrel2Server, size: int) -> None:
        engine = self.engine = server.engine
        self.server = server
        self.size = size
        self.pull_lock = engine.lock()
        self.lock = engine.core_lock()  # the counts below
        self.tasks = 0
        self.free = 0  # tasks not running a request
        self.busy_since = 0.0  # when ``free`` last dropped to 0
        self.needed_at = 0.0  # when help (another task) was last needed
        self.all_busy = engine.flag()
        self.stopped = False

    def start(self) -> None:
        self._add()
        self.engine.spawn(self._monitor)

    def stop(self) -> None:
        self.stopped = True
        self.all_busy.set()

    def _add(self) -> None:
        with self.lock:
            self.tasks += 1
            self.free += 1
        self.engine.spawn(self._work)

    def _leave(self) -> bool:
        """An idle task may leave, unless it is the last one (counted out here, under the
        lock: two idle tasks must not both leave the last)."""
        with self.lock:
            if self.tasks <= 1:
                return False
            self.tasks -= 1
            self.free -= 1
            return True

    def _monitor(self) -> None:
        wait, clear, delay = self.all_busy.wait, self.all_busy.clear, HELP_DELAY
        sleep = self.engine.sleep
        while not self.stopped:
            wait()
            sleep(delay)
            clear()
            with self.lock:
                now = time.monotonic()
                help_needed = not self.free and now - self.busy_since >= delay
                if help_needed:
                    self.needed_at = now
                    help_needed = self.tasks < self.size
                if not self.free:
                    self.all_busy.set()  # look again after the next delay
            if help_needed and not self.stopped:
                self._add()

    def _work(self) -> None:
        server = self.server
        lock, pull_lock, all_busy = self.lock, self.pull_lock, self.all_busy
        run = server.run
        left = False

        def leave() -> bool:
            nonlocal left
            left = self._leave()
            return left

        try:
            while True:
                with pull_lock:
                    job = server.receive_job(leave)
                if job is None:
                    return
                with lock:
                    self.free -= 1
                    if not self.free:
                        self.busy_since = time.monotonic()
                        if not all_busy.is_set():
                            all_busy.set()
                run(*job)
                if server.credit is not None:
                    server.credit.returned()
                with lock:
                    self.free += 1
                    if self.tasks > 1 and time.monotonic() - self.needed_at >= SHRINK_AFTER:
                        # not needed lately: leave (and the next one only after as long)
                        self.needed_at = time.monotonic()
                        self.tasks -= 1
                        self.free -= 1
                        left = True
                        return
        except Exception:
            log.exception("unexpected error in a Mongrel2 handler task")
        finally:
            if not left:
                with lock:
                    self.tasks -= 1
                    self.free -= 1


def _no_body(size: int = -1) -> bytes:
    return b""


class Mongrel2Server(Server):
    """The Mongrel2 handler on an engine; the engine modules subclass it."""

    engine_class: ClassVar[type[Engine]] = ThreadEngine
    # OS threads block in ZeroMQ's calls (with timeouts); a cooperative engine makes them
    # non-blocking and waits for the socket's descriptor in its own hub (``wait_socket``)
    blocking: ClassVar[bool] = True

    def __init__(self, app: WSGIApp, listener: Listener, settings: Settings) -> None:
        super().__init__(app, listener, settings)
        self.engine = engine = self.engine_class()
        import zmq

        self.zmq = zmq
        self.endpoints, self.uploads, self.where = self._endpoints(settings)
        self.settings_from_db = bool(settings.m2_config)  # limits.content_length read there
        identity = settings.m2_identity or self.endpoints.identity
        self.identity = identity.encode() if identity else None
        self.timeout: float | None = settings.timeout or None
        self.catch_up = float(settings.graceful_timeout) * CATCH_UP_SHARE
        self.max_headers: int = settings.limit_request_headers
        self.size: int = settings.threads if engine.multithread else settings.spawn or DEFAULT_SPAWN
        # several handler processes commonly share one Mongrel2: say so to the app
        self.base = base_environ(engine.multithread, True)
        self.base["SERVER_SOFTWARE"] = SERVER_SOFTWARE
        self.base["wsgi.input_terminated"] = True
        self.state_lock = engine.core_lock()
        self.conns: dict[tuple[str, str], M2Conn] = {}
        # connections we closed, until Mongrel2 says they are gone: what still comes for
        # them (the done message of a refused upload) is dropped, not answered again
        self.closed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.requests = 0  # received and not finished (what a drain waits for)
        self.stopping = False
        self.receiver_done = engine.flag()
        self.log_access = access.isEnabledFor(logging.INFO)
        self.ctx: Any = None
        self.pull: Any = None
        self.drain: PullDrain | None = None  # set by start()
        self.dispatcher: str | None = settings.m2_dispatcher or None
        if self.dispatcher is not None and not self.dispatcher.startswith(("tcp://", "ipc://")):
            raise UsageError(
                f"--m2-dispatcher {self.dispatcher}: not a ZeroMQ endpoint "
                "(tcp://host:port or ipc://path)"
            )
        self.credit: Credit | None = None  # credit mode: set by start()
        self.leftover: deque[Job] = deque()  # requests left in the queue when we closed it
        self.publisher: Publisher = None  # type: ignore[assignment]  # set by start()
        self.crew: Crew | None = None
        self.idle_since = time.monotonic()

    @staticmethod
    def _endpoints(settings: Settings) -> tuple[Endpoints, UploadPlace, str]:
        upload_dir = settings.upload_dir
        if upload_dir and not os.path.isdir(upload_dir):
            raise UsageError(f"--upload-dir {upload_dir}: not a directory")
        chosen = os.path.realpath(upload_dir) if upload_dir else None
        if settings.m2_config:
            config = load_handler(settings.m2_config, settings.m2_handler)
            place = config.upload
            if chosen:
                place = UploadPlace(chosen, place.root, place.content_limit)
            elif place.directory and not os.path.isdir(place.directory):
                log.warning(
                    "upload directory %s (from Mongrel2's upload.temp_store) does not exist",
                    place.directory,
                )
            return config.endpoints, place, f"handler {config.description}"
        try:
            endpoints = parse_zeromq(settings.zeromq or "")
        except ValueError as exc:
            raise UsageError(f"--zeromq {settings.zeromq}: {exc}") from None
        return endpoints, UploadPlace(chosen), "handler"

    # -- Server API --

    def start(self) -> None:
        zmq = self.zmq
        self.ctx = zmq.Context()
        batch_io_thread(zmq, self.ctx)
        if self.dispatcher is not None:
            self.publisher = Publisher(self, self.endpoints.recv_spec, self.identity, self.timeout)
            self.credit = Credit(self, self.dispatcher)
            self.pull = self.credit.dealer
            log.info(
                "Mongrel2 %s: requests from the dispatcher at %s (credit mode, %d at a time), "
                "replies to %s",
                self.where,
                self.dispatcher,
                self.size,
                self.endpoints.recv_spec,
            )
            self._start_crew()
            return
        pull = self.pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, RCV_HWM)
        if self.blocking:
            pull.setsockopt(zmq.RCVTIMEO, int(TICK * 1000))
        pull.setsockopt(zmq.LINGER, 0)
        if self.identity:
            pull.setsockopt(zmq.IDENTITY, self.identity)
        # before connect(): the drain needs to know our connection from its first event
        monitor = pull.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.drain = PullDrain(self, pull, monitor)
        pull.connect(self.endpoints.send_spec)
        self.publisher = Publisher(self, self.endpoints.recv_spec, self.identity, self.timeout)
        log.info(
            "Mongrel2 %s: requests from %s, replies to %s; waiting for Mongrel2 "
            "(it holds requests until a handler is connected)",
            self.where,
            self.endpoints.send_spec,
            self.endpoints.recv_spec,
        )
        self._start_crew()

    def _start_crew(self) -> None:
        if self.uploads.directory is None:
            log.info("async uploads are refused (400): no --upload-dir")
        else:
            log.info(
                "async uploads read from %s (bodies over %d bytes: Mongrel2's "
                "limits.content_length%s)",
                self.uploads.directory,
                self.uploads.content_limit,
                "" if self.settings_from_db else ", assumed: the default",
            )
        self.crew = Crew(self, self.size)
        self.crew.start()

    def stop_accepting(self) -> None:
        self.stopping = True

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.requests <= 0 and self.receiver_done.is_set():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.engine.sleep(min(left, 0.01))

    def in_flight(self) -> int:
        return self.requests

    def wait_readable(self, fd: int, timeout: float | None) -> None:
        self.engine.wait_readable(fd, timeout)

    def close(self) -> None:
        self.stopping = True
        if self.crew is not None:
            self.crew.stop()
        if self.ctx is None:
            return
        received = self.receiver_done.wait(TICK * 20)
        for conn in list(self.conns.values()):
            conn.gone = True  # ends what is still running at its next chunk
        self.publisher.close()
        if self.credit is not None:
            self.credit.close()
        if received:
            self.ctx.term()  # waits (up to LINGER_MS) for the replies still queued
        self.ctx = None

    # -- receiving --

    def recv(self) -> bytes | None:
        """One message, or None after ``TICK`` seconds without one."""
        zmq = self.zmq
        if self.credit is not None:
            frames = self.credit.recv(TICK)
            if frames is None:
                return None
            if len(frames) == 1:
                return frames[0]
            log.warning("dropped an unexpected message from the dispatcher")
            self.credit.owe()
            return None
        if self.blocking:
            try:
                msg: bytes = self.pull.recv()
            except zmq.Again:
                return None
            return msg
        try:
            return self.pull.recv(zmq.NOBLOCK)  # type: ignore[no-any-return]
        except zmq.Again:
            pass
        if not self.wait_socket(self.pull, zmq.POLLIN, TICK):
            return None
        try:
            return self.pull.recv(zmq.NOBLOCK)  # type: ignore[no-any-return]
        except zmq.Again:
            return None

    def wait_socket(self, sock: Any, event: int, timeout: float) -> bool:
        """A cooperative engine's wait until ``sock`` can ``event`` (POLLIN, POLLOUT);
        False after ``timeout`` seconds. ZeroMQ's descriptor only says that its events may
        have changed (edge-triggered): the events are read again before each wait."""
        zmq = self.zmq
        deadline = time.monotonic() + timeout
        fd = sock.getsockopt(zmq.FD)
        while True:
            if sock.getsockopt(zmq.EVENTS) & event:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wait_fd(fd, left)

    def wait_fd(self, fd: int, timeout: float) -> None:
        """Wait until ``fd`` is readable or ``timeout`` passes, letting other tasks run."""
        self.engine.wait_readable(fd, timeout)

    def wait_fds(self, fds: tuple[int, ...], timeout: float) -> None:
        """Wait until one of ``fds`` is readable or ``timeout`` passes, letting other tasks
        run (the cooperative engines override it)."""
        select.select(fds, (), (), timeout)

    def receive_job(self, leave: Callable[[], bool]) -> Job | None:
        """For a crew thread holding the socket: receive until there is a request to run;
        None when the thread should end: the drain is over, or idle for ``IDLE_TIMEOUT``
        and ``leave()`` agrees (it does for all but one thread). In a drain, requests
        still come (those Mongrel2 sent before it saw us leave) and run as usual."""
        zmq = self.zmq
        while self.pull is not None:
            if self.stopping:
                msg = self.drain_receive()
                if msg is None:
                    break
            else:
                try:
                    msg = self.recv()
                except zmq.ZMQError as exc:
                    log.error("receiving from Mongrel2 failed: %s", exc)
                    self.engine.sleep(TICK)
                    continue
                if msg is None:
                    self.publisher.check()
                    if self.drain is not None:
                        self.drain.events()  # keeps the monitor's queue short
                    if time.monotonic() - self.idle_since >= IDLE_TIMEOUT and leave():
                        return None
                    continue
                self.idle_since = time.monotonic()
            job = self.dispatch(msg)
            if job is not None:
                return job
            if self.credit is not None:
                self.credit.owe()  # it took no task
        # the drain is over: what was left in the queue is run by whichever tasks come
        try:
            return self.leftover.popleft()
        except IndexError:
            return None

    def drain_receive(self) -> bytes | None:
        """In a drain: the next message Mongrel2 sent before it saw us leave; None once
        every connection has ended (the socket is closed then: what was left in its queue
        is in ``leftover``)."""
        if self.credit is not None:
            return self.credit_drain_receive(self.credit)
        zmq = self.zmq
        pull, drain = self.pull, self.drain
        assert pull is not None and drain is not None
        if not drain.shutting:
            # first what Mongrel2 has queued for us: a half-close would make it drop what
            # it still holds in its own queue (it holds some when we are slower than it
            # sends: then the socket buffers between us are full)
            if not drain.catch_up_until:
                drain.catch_up_until = time.monotonic() + self.catch_up
            while time.monotonic() < drain.catch_up_until:
                try:
                    return pull.recv(zmq.NOBLOCK)  # type: ignore[no-any-return]
                except zmq.Again:
                    pass
                except zmq.ZMQError:
                    break
                drain.events()
                if not drain.unread():
                    break  # our queue and the kernel's are empty: we have caught up
                self.wait_pull(pull, DRAIN_POLL)
            drain.start()
        while not drain.done():
            try:
                return pull.recv(zmq.NOBLOCK)  # type: ignore[no-any-return]
            except zmq.Again:
                pass
            except zmq.ZMQError:
                break
            self.wait_pull(pull, DRAIN_POLL)
        # our queue is complete: take it all at once (ZeroMQ would connect again after
        # 100 ms, and Mongrel2 give us new requests), then close
        rest = []
        while True:
            try:
                rest.append(pull.recv(zmq.NOBLOCK))
            except zmq.ZMQError:
                break
        self.pull = None
        drain.close()
        pull.close(linger=0)
        log.info(
            "disconnected from Mongrel2 (%s): %d more request(s) to serve",
            self.endpoints.send_spec,
            len(rest),
        )
        for msg in rest:
            job = self.dispatch(msg)
            if job is not None:
                self.leftover.append(job)
        self.receiver_done.set()
        return None

    def credit_drain_receive(self, credit: Credit) -> bytes | None:
        """In a drain, credit mode: the next request the dispatcher gave us before it
        read our BYE; None once its answer has come (nothing can follow it)."""
        if not credit.leaving:
            credit.leave()
        while True:
            frames = credit.recv(DRAIN_POLL)
            if frames is not None:
                if len(frames) == 1:
                    return frames[0]
                if frames == [b"", b"BYE"]:
                    log.info("disconnected from the dispatcher (%s)", credit.spec)
                    break
                log.warning("dropped an unexpected message from the dispatcher")
            elif time.monotonic() - credit.leaving >= DISCONNECT_WAIT:
                log.warning(
                    "the dispatcher (%s) did not answer our goodbye in %g s: leaving anyway",
                    credit.spec,
                    DISCONNECT_WAIT,
                )
                break
        self.pull = None
        credit.close_receiver()
        self.receiver_done.set()
        return None

    def wait_pull(self, pull: Any, timeout: float) -> None:
        """In a drain: until a message may have come, at most ``timeout`` seconds."""
        if self.blocking:
            pull.poll(int(timeout * 1000))
        else:
            self.wait_socket(pull, self.zmq.POLLIN, timeout)

    def dispatch(self, msg: bytes) -> Job | None:
        """Act on one message; returns the request to run now, if there is one."""
        try:
            request = core.parse_request(msg, max_headers_size=self.max_headers)
        except RemoteProtocolError as exc:
            return self._malformed(msg, exc)
        key = (request.sender, request.conn_id)
        if self.closed and key in self.closed:
            if request.is_disconnect:
                with self.state_lock:
                    self.closed.pop(key, None)
            else:
                log.debug("message for connection %s, which we closed: dropped", key[1])
            return None
        if request.is_disconnect:
            self._disconnected(key)
            return None
        try:
            stage = core.upload_stage(request)
        except core.UploadError as exc:
            return self._enqueue(request, str(exc))
        if stage == "done":
            return self._upload_done(request)
        return self._enqueue(request, None)

    def _malformed(self, msg: bytes, exc: RemoteProtocolError) -> Job | None:
        parts = msg.split(b" ", 2)
        if (
            len(parts) < 2
            or not (parts[1].isdigit() and len(parts[1]) <= 20)
            or not 0 < len(parts[0]) <= 256
        ):
            log.warning("dropped a message Mongrel2 sent: %s", exc)
            return None
        request = core.Request(parts[0].decode("latin-1"), parts[1].decode(), "", {}, b"")
        return self._enqueue(request, str(exc))

    def closing(self, conn: M2Conn) -> None:
        """We are about to ask Mongrel2 to close ``conn``."""
        with self.state_lock:
            conn.closed = True
            self.closed[conn.key] = None
            if len(self.closed) > MAX_CLOSED:
                self.closed.popitem(last=False)

    def _disconnected(self, key: tuple[str, str]) -> None:
        with self.state_lock:
            conn = self.conns.get(key)
            if conn is None:
                return
            conn.gone = True
            self.requests -= len(conn.backlog)
            conn.backlog.clear()
            wake = conn.wake
        if wake is not None:
            wake.set()

    def _upload_done(self, request: core.Request) -> Job | None:
        name = request.upload_done
        try:
            # a done message of Mongrel2's carries the request's headers: its Content-Length
            # is over the limit. Any other is a client's request, to answer (400)
            spooled_length(self.uploads, request.header("content-length"))
        except UploadRefused as exc:
            return self._enqueue(request, str(exc))
        with self.state_lock:
            conn = self.conns.get((request.sender, request.conn_id))
            upload = conn.upload if conn is not None else None
            wake = conn.wake if conn is not None else None
            if upload is not None and upload.spool.name == name:
                upload.done = True
                if wake is not None:
                    wake.set()
                return None
        try:
            resolve(self.uploads, name or "")
        except UploadRefused as exc:
            return self._enqueue(request, str(exc))
        # the start went to another handler process: not ours to answer
        log.debug("upload-done for %s on connection %s: not started here", name, request.conn_id)
        return None

    def _enqueue(self, request: core.Request, refusal: str | None) -> Job | None:
        """The job to run now, or None when the connection already has one running (the
        request waits behind it) or is gone."""
        key = (request.sender, request.conn_id)
        with self.state_lock:
            conn = self.conns.get(key)
            if conn is not None:
                if conn.gone or conn.closed:
                    return None
                if len(conn.backlog) < MAX_PIPELINE:
                    conn.backlog.append((request, refusal))
                    self.requests += 1
                    return None
                self.requests -= len(conn.backlog)
                conn.backlog.clear()
                conn.gone = True
            else:
                conn = self.conns[key] = M2Conn(key)
                self.requests += 1
        if conn.gone:  # too many requests ahead: close the connection
            log.warning(
                "connection %s sent over %d requests ahead: closed", request.conn_id, MAX_PIPELINE
            )
            self.closing(conn)  # what Mongrel2 sent before it acts on the close is dropped
            self._send_quietly(conn.prefix, conn.epoch)
            return None
        conn.epoch = self.publisher.epoch_now()
        return conn, request, refusal

    def _send_quietly(self, frame: bytes, epoch: int) -> None:
        try:
            self.publisher.send(frame, epoch)
        except OSError as exc:
            log.debug("reply to Mongrel2 not sent: %s", exc)

    # -- requests --

    def run(self, conn: M2Conn, request: core.Request, refusal: str | None) -> None:
        while True:
            try:
                if refusal is None:
                    self.respond(conn, request)
                else:
                    self.refuse(conn, request, refusal)
            except Exception:
                log.exception("unexpected error serving a Mongrel2 request")
            with self.state_lock:
                self.requests -= 1
                if conn.backlog and not conn.gone and not conn.closed:
                    request, refusal = conn.backlog.popleft()
                    continue
                self.requests -= len(conn.backlog)
                conn.backlog.clear()
                del self.conns[conn.key]
                return

    def respond(self, conn: M2Conn, request: core.Request) -> None:
        started = time.monotonic() if self.log_access else 0.0
        upload: UploadBody | None = None
        if request.upload_start is not None:
            try:
                upload = self._open_upload(conn, request)
            except UploadRefused as exc:
                self.refuse(conn, request, str(exc))
                return
            read_some: Callable[[int], bytes] = upload.read_some
        elif request.body:
            read_some = io.BytesIO(request.body).read
        else:
            read_some = _no_body
        try:
            environ = core.wsgi_environ(request, self.base)
            environ["wsgi.input"] = BodyReader(read_some)
            environ["wsgi.errors"] = ErrorStream()
            response = BufferedResponse(self.app, environ, Reply(self, conn, request))
            response.run()
        finally:
            if upload is not None:
                with self.state_lock:
                    conn.upload = None
                upload.finish()
        if self.log_access:
            ProtocolServer.access_line(environ, response.status_code, response.body_bytes, started)

    def _open_upload(self, conn: M2Conn, request: core.Request) -> UploadBody:
        length = spooled_length(self.uploads, request.header("content-length"))
        spool = SpoolFile(self.uploads, request.upload_start or "")
        wake = self.engine.flag()
        upload = UploadBody(spool, length, wake.wait, lambda: conn.gone, self.timeout)
        with self.state_lock:
            conn.wake = wake
            conn.upload = upload
        return upload

    def refuse(self, conn: M2Conn, request: core.Request, reason: str) -> None:
        """400 and close: the message is not one Mongrel2 makes, or names a file we may
        not read. Logged once; nothing else happens."""
        log.warning(
            "refused a request from Mongrel2 (connection %s, %s %s): %s; answered 400",
            request.conn_id,
            request.headers.get("METHOD", "-"),
            request.headers.get("PATH", request.path or "-"),
            reason,
        )
        if request.upload_start and self.uploads.directory and self._spooled(request):
            self._remove_spool(request.upload_start)
        if conn.gone:
            return
        body = b"Bad Request\n"
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        reply = Reply(self, conn, request)
        head = core.response_head(request, "400 Bad Request", headers, chunked=False, close=True)
        try:
            self.publisher.send(reply.prefix + head + body, conn.epoch)
            reply.close_connection()
        except OSError as exc:
            log.debug("400 not sent: %s", exc)

    def _spooled(self, request: core.Request) -> bool:
        """Whether Mongrel2 spooled this request's body (so the upload-start header is
        its own, naming the file it made for this request)."""
        try:
            spooled_length(self.uploads, request.header("content-length"))
        except UploadRefused:
            return False
        return True

    def _remove_spool(self, name: str) -> None:
        """A refused upload's file, named by Mongrel2 (``_spooled``), if it is one we may
        delete: a regular file in the upload directory."""
        try:
            spool = SpoolFile(self.uploads, name)
        except UploadRefused:
            return
        spool.close()
        spool.delete()
