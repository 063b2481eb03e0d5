"""A request dispatcher between Mongrel2 and several handlers.

Mongrel2 hands requests out with a PUSH socket: each goes to whichever connected handler is
next, so two requests of one keep-alive connection may land in two processes, and nothing
can be said about where. The dispatcher takes Mongrel2's place towards the handlers and
chooses::

    mongrel2 --PUSH--> [PULL  dispatcher  PUSH slot 0] --> handler A (PULL)
                       [                  PUSH slot 1] --> handler B (PULL)
    mongrel2 <--SUB--- [XPUB              SUB replies] <-- handlers A, B (PUB)

    python -m chaussette.devices.dispatcher --zeromq tcp://127.0.0.1:9997,tcp://127.0.0.1:9996 \\
        --handlers tcp://127.0.0.1:9001,tcp://127.0.0.1:9002 --replies tcp://127.0.0.1:9000
    chaussette --protocol mongrel2 --zeromq tcp://127.0.0.1:9001,tcp://127.0.0.1:9000 app:app
    chaussette --protocol mongrel2 --zeromq tcp://127.0.0.1:9002,tcp://127.0.0.1:9000 app:app

Handlers need nothing special: each connects to its *slot* (a PUSH endpoint the
dispatcher binds) as it would to Mongrel2's send_spec, and all publish their replies to
the one ``--replies`` endpoint, which the dispatcher forwards to Mongrel2 unchanged (a
reply names its connections itself). A slot is one handler; several handlers on one slot
share it as they would share Mongrel2's PUSH.

Rules it keeps:

- ``--rule sticky`` (default): every request of one Mongrel2 connection (sender, conn id)
  goes to the same slot; a new connection goes to the next live slot in turn. The table is
  an LRU bounded by ``--max-connections``; an entry goes when Mongrel2 says the connection
  is gone, when a handler closes it (an empty reply), or when its slot's handler leaves.
- ``--rule round-robin``: each request to the next live slot in turn.
- Whatever the rule, the two messages of an async upload (upload-start, upload-done) go to
  the same slot, and Mongrel2's disconnect notices are forwarded: to the connection's slot
  (sticky; dropped when the connection is unknown), to every live slot (round robin).
- A slot is live while a handler is connected to it (ZeroMQ socket monitor). With no live
  slot, the dispatcher stops reading from Mongrel2, which queues the requests as it does
  when no handler is connected.
- A slot whose queue is full (its handler is stuck) makes round robin try the others;
  sticky waits up to ``--send-timeout`` for it, then drops the request with a warning.
- A malformed message from Mongrel2 is dropped and logged once; messages over
  ``--max-message`` bytes end the peer's ZeroMQ connection (ZMQ_MAXMSGSIZE).

Credit mode (``--credit SPEC``, ``CreditDispatcher``) is for restarts that lose nothing:
handlers started with ``--m2-dispatcher SPEC`` connect a DEALER to the ROUTER bound there
and ask for requests (``READY n``); each goes to a handler with credit, in turn (disconnect
notices and upload-done messages to the handler that has the connection), and waits in a
bounded queue (``--max-queue``) while none has any. A leaving handler says ``BYE`` and is
answered ``BYE``, after which it is given nothing. Replies go from the handlers straight to
Mongrel2's recv_spec::

    python -m chaussette.devices.dispatcher --zeromq tcp://127.0.0.1:9997,tcp://127.0.0.1:9996 \\
        --credit tcp://127.0.0.1:9995
    chaussette --protocol mongrel2 --zeromq tcp://127.0.0.1:9997,tcp://127.0.0.1:9996 \\
        --m2-dispatcher tcp://127.0.0.1:9995 app:app
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chaussette.devices import common
from chaussette.devices.common import Endpoint
from chaussette.errors import UsageError
from chaussette.protocols import mongrel2
from chaussette.protocols.errors import RemoteProtocolError

log = logging.getLogger("chaussette.devices.dispatcher")

RULES = ("sticky", "round-robin")
MAX_CONNECTIONS = 100_000
MAX_MESSAGE = 64 * 1024 * 1024
SEND_TIMEOUT = 5.0
LINGER_MS = 1000
BATCH = 256  # messages handled from one socket before looking at the others

Key = tuple[str, str]  # (sender, conn_id)
V = TypeVar("V")


def classify(msg: bytes) -> tuple[mongrel2.Request, Key, str | None] | None:
    """A message from Mongrel2: its request, connection key and upload stage ("start",
    "done" or None; None too for upload headers a client forged: the handler answers 400
    wherever it lands). None, logged, for a malformed message."""
    try:
        request = mongrel2.parse_request(msg)
    except RemoteProtocolError as exc:
        log.warning("dropped a malformed message from Mongrel2: %s", exc)
        return None
    try:
        stage = mongrel2.upload_stage(request)
    except mongrel2.UploadError:
        stage = None
    return request, (request.sender, request.conn_id), stage


def remember(table: OrderedDict[Key, V], key: Key, value: V, bound: int) -> None:
    """``table[key] = value`` as the newest entry, the oldest dropped beyond ``bound``."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > bound:
        table.popitem(last=False)


@dataclass(eq=False)
class Slot:
    """One handler endpoint the dispatcher binds."""

    index: int
    endpoint: Endpoint
    socket: Any
    monitor: Any
    peers: set[int] = field(default_factory=set)  # fds of the connected handlers
    routed: int = 0

    @property
    def alive(self) -> bool:
        return bool(self.peers)


class Dispatcher:
    """The device; ``run(stopping)`` until ``stopping()`` is true, then ``close()``."""

    def __init__(
        self,
        upstream: tuple[Endpoint, Endpoint],
        handlers: Sequence[Endpoint],
        replies: Endpoint,
        *,
        rule: str = "sticky",
        max_connections: int = MAX_CONNECTIONS,
        max_message: int = MAX_MESSAGE,
        send_timeout: float = SEND_TIMEOUT,
        context: Any = None,
    ) -> None:
        zmq = common.import_zmq("the dispatcher device")
        if rule not in RULES:
            raise UsageError(f"--rule {rule}: unknown rule (one of: {', '.join(RULES)})")
        if not handlers:
            raise UsageError("--handlers: give at least one handler endpoint")
        self.zmq = zmq
        self.rule = rule
        self.max_connections = max_connections
        self.send_timeout = send_timeout
        self.own_context = context is None
        self.context = context or zmq.Context()
        self.sockets: list[Any] = []
        self.slots: list[Slot] = []
        self.sticky: OrderedDict[Key, Slot] = OrderedDict()
        self.uploads: OrderedDict[Key, Slot] = OrderedDict()
        self._turn = itertools.count()
        self.endpoints = (*upstream, replies)
        try:
            send, recv = upstream
            self.requests = self._socket(zmq.PULL, max_message)
            if send.identity:
                self.requests.setsockopt(zmq.IDENTITY, send.identity.encode())
            self.requests.connect(send.address)
            # XPUB, not PUB: Mongrel2's subscription shows, so the startup log can say when
            # replies flow (before it, they would be dropped: ZeroMQ's slow joiner)
            self.upstream = self._socket(zmq.XPUB)
            self.upstream.connect(recv.address)
            self.subscribed = 0
            self.replies = self._socket(zmq.SUB, max_message)
            self.replies.setsockopt(zmq.SUBSCRIBE, b"")
            self._bind(self.replies, replies, "--replies")
            events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
            for index, endpoint in enumerate(handlers):
                sock = self._socket(zmq.PUSH)
                monitor = sock.get_monitor_socket(events)
                self.sockets.append(monitor)
                self._bind(sock, endpoint, "--handlers")
                self.slots.append(Slot(index, endpoint, sock, monitor))
        except BaseException:
            self.close()
            raise

    def _socket(self, kind: int, max_message: int | None = None) -> Any:
        sock = self.context.socket(kind)
        self.sockets.append(sock)
        sock.setsockopt(self.zmq.LINGER, LINGER_MS)
        if max_message:
            sock.setsockopt(self.zmq.MAXMSGSIZE, max_message)
        return sock

    def _bind(self, sock: Any, endpoint: Endpoint, what: str) -> None:
        try:
            sock.bind(endpoint.address)
        except self.zmq.ZMQError as exc:
            raise UsageError(f"{what} {endpoint.address}: cannot bind: {exc}") from None

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot.socket.disable_monitor()
            except self.zmq.ZMQError:
                pass
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        if self.own_context:
            self.context.term()

    # -- the loop --

    def run(self, stopping: Callable[[], bool]) -> int:
        zmq = self.zmq
        log.info(
            "routing requests from %s (replies to %s) by rule %s to %d slot(s): %s; "
            "handlers publish replies to %s",
            self.endpoints[0].address,
            self.endpoints[1].address,
            self.rule,
            len(self.slots),
            ", ".join(s.endpoint.address for s in self.slots),
            self.endpoints[2].address,
        )
        poller = zmq.Poller()
        monitors = {slot.monitor: slot for slot in self.slots}
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        poller.register(self.upstream, zmq.POLLIN)
        pulling: bool | None = None  # reading from Mongrel2 (None: not decided yet)
        while not stopping():
            live = any(slot.alive for slot in self.slots)
            if live != pulling:
                if live:
                    poller.register(self.requests, zmq.POLLIN)
                    log.info("reading requests from Mongrel2")
                else:
                    if pulling:
                        poller.unregister(self.requests)
                    log.warning("no handler connected: requests wait in Mongrel2's queue")
                pulling = live
            ready = dict(poller.poll(common.POLL_MS))
            for monitor, slot in monitors.items():
                if monitor in ready:
                    self._monitor_event(slot)
            if self.upstream in ready:
                self._subscriptions()
            if self.replies in ready:
                self._drain(self.replies, self._reply)
            if pulling and self.requests in ready:
                self._drain(self.requests, self._request)
        log.info("stopping; %s", ", ".join(f"slot {s.index}: {s.routed}" for s in self.slots))
        return 0

    def _drain(self, sock: Any, handle: Callable[[bytes], None]) -> None:
        for _ in range(BATCH):
            try:
                msg = sock.recv(self.zmq.NOBLOCK)
            except self.zmq.Again:
                return
            handle(msg)
            if sock is self.requests and not any(s.alive for s in self.slots):
                return

    def _monitor_event(self, slot: Slot) -> None:
        from zmq.utils.monitor import recv_monitor_message

        for _ in range(BATCH):
            try:
                event = recv_monitor_message(slot.monitor, self.zmq.NOBLOCK)
            except self.zmq.Again:
                return
            if event["event"] == self.zmq.EVENT_ACCEPTED:
                slot.peers.add(event["value"])
                log.info(
                    "handler connected to slot %d (%s): %d there",
                    slot.index,
                    slot.endpoint.address,
                    len(slot.peers),
                )
            elif event["event"] == self.zmq.EVENT_DISCONNECTED and event["value"] in slot.peers:
                slot.peers.discard(event["value"])
                log.info("handler left slot %d (%s)", slot.index, slot.endpoint.address)
                if not slot.alive:
                    self._forget_slot(slot)

    def _subscriptions(self) -> None:
        before = self.subscribed
        for _ in range(BATCH):
            try:
                msg = self.upstream.recv(self.zmq.NOBLOCK)
            except self.zmq.Again:
                break
            if msg[:1] == b"\x01":
                self.subscribed += 1
            elif msg[:1] == b"\x00" and self.subscribed:
                self.subscribed -= 1
        if self.subscribed and not before:
            log.info("connected to Mongrel2: replies to %s", self.endpoints[1].address)
        elif before and not self.subscribed:
            log.warning("Mongrel2 at %s went away; waiting for it", self.endpoints[1].address)

    def _forget_slot(self, slot: Slot) -> None:
        for table in (self.sticky, self.uploads):
            for key in [k for k, s in table.items() if s is slot]:
                del table[key]

    # -- requests: Mongrel2 -> a slot --

    def _request(self, msg: bytes) -> None:
        found = classify(msg)
        if found is None:
            return
        request, key, stage = found
        if request.is_disconnect:
            targets = self._disconnect_targets(key)
            if not targets:
                log.debug("disconnect of unknown connection %s %s dropped", *key)
            for target in targets:
                self._send(target, msg, fallback=False)
            return
        slot = self._choose(key, stage)
        if slot is not None:
            self._send(slot, msg, fallback=self.rule == "round-robin")

    def _choose(self, key: Key, stage: str | None) -> Slot | None:
        if stage == "done":
            paired = self.uploads.pop(key, None)
            if paired is not None and paired.alive:
                return paired
        slot: Slot | None = None
        if self.rule == "sticky":
            slot = self.sticky.get(key)
            if slot is None or not slot.alive:
                slot = self._next_live()
                if slot is not None:
                    self._remember(self.sticky, key, slot)
            else:
                self.sticky.move_to_end(key)
        else:
            slot = self._next_live()
        if slot is not None and stage == "start":
            self._remember(self.uploads, key, slot)
        return slot

    def _remember(self, table: OrderedDict[Key, Slot], key: Key, slot: Slot) -> None:
        remember(table, key, slot, self.max_connections)

    def _next_live(self, skip: Slot | None = None) -> Slot | None:
        for _ in range(len(self.slots)):
            slot = self.slots[next(self._turn) % len(self.slots)]
            if slot.alive and slot is not skip:
                return slot
        return None

    def _disconnect_targets(self, key: Key) -> list[Slot]:
        self.uploads.pop(key, None)
        if self.rule == "sticky":
            slot = self.sticky.pop(key, None)
            return [slot] if slot is not None and slot.alive else []
        return [slot for slot in self.slots if slot.alive]

    def _send(self, slot: Slot, msg: bytes, *, fallback: bool) -> None:
        zmq = self.zmq
        tried = 0
        current: Slot | None = slot
        while current is not None and tried < len(self.slots):
            try:
                current.socket.send(msg, zmq.NOBLOCK)
                current.routed += 1
                return
            except zmq.Again:
                tried += 1
                if not fallback:
                    break
                current = self._next_live(skip=current)
        # wait for the chosen slot itself, bounded (its handler may just be connecting)
        deadline = time.monotonic() + self.send_timeout
        while time.monotonic() < deadline and slot.alive:
            if slot.socket.poll(50, zmq.POLLOUT):
                try:
                    slot.socket.send(msg, zmq.NOBLOCK)
                    slot.routed += 1
                    return
                except zmq.Again:
                    continue
            self._poll_monitor(slot)
        log.warning(
            "slot %d (%s) takes no more requests: one dropped", slot.index, slot.endpoint.address
        )

    def _poll_monitor(self, slot: Slot) -> None:
        if slot.monitor.poll(0, self.zmq.POLLIN):
            self._monitor_event(slot)

    # -- replies: handlers -> Mongrel2 --

    def _reply(self, msg: bytes) -> None:
        if msg.endswith(b", ") and len(msg) < 65536:  # maybe a close: forget the connections
            try:
                sender, ids, payload = mongrel2.parse_reply(msg)
            except RemoteProtocolError:
                sender, ids, payload = "", [], b"-"
            if not payload:
                for conn_id in ids:
                    self.sticky.pop((sender, conn_id), None)
        self.upstream.send(msg)


# -- credit mode: a request only to a handler that asked for one --

CREDIT_MAX = 1_000_000  # the most credit one message may grant
MAX_QUEUE = 10_000
DRAIN_TIMEOUT = 10.0  # seconds a stopping dispatcher waits for handlers to take its queue


@dataclass(eq=False)
class Handler:
    """A handler connected to the credit endpoint, known by its ROUTER identity."""

    identity: bytes
    credit: int = 0  # requests it asked for and has not been given yet
    routed: int = 0
    queued_ready: bool = False  # in CreditDispatcher.ready


class CreditDispatcher:
    """Credit mode: handlers connect a DEALER to ``--credit`` (a ROUTER the dispatcher
    binds) and ask for requests (``READY n``: n more); each request from Mongrel2 goes to
    a handler with credit, in turn, and waits in a bounded queue while none has any. A
    handler that leaves says ``BYE``; the dispatcher answers ``BYE`` (an empty frame, then
    ``BYE``) and gives it nothing after that, so the handler knows that whatever came
    before the answer is all it will get. Replies do not pass here: handlers publish them
    to Mongrel2's recv_spec themselves.

    A handler that vanished without ``BYE`` (killed) is noticed when a send to it fails
    (ROUTER_MANDATORY: ZeroMQ has seen its connection end): its credit is dropped and the
    request goes to another. What was sent to it before its connection was seen to end is
    lost with it, as requests are with any killed process.
    """

    def __init__(
        self,
        upstream: Endpoint,
        credit: Endpoint,
        *,
        max_queue: int = MAX_QUEUE,
        max_connections: int = MAX_CONNECTIONS,
        max_message: int = MAX_MESSAGE,
        drain_timeout: float = DRAIN_TIMEOUT,
        context: Any = None,
    ) -> None:
        zmq = self.zmq = common.import_zmq("the dispatcher device")
        self.max_queue = max_queue
        self.drain_timeout = drain_timeout
        self.max_connections = max_connections
        self.own_context = context is None
        self.context = context or zmq.Context()
        self.sockets: list[Any] = []
        self.handlers: dict[bytes, Handler] = {}
        self.ready: deque[Handler] = deque()  # handlers with credit, in turn
        self.queue: deque[tuple[bytes, Key, str | None]] = deque()  # waiting for credit
        # the handler that has each connection: disconnect notices and upload-done
        # messages go there (LRU, bounded by max_connections)
        self.owners: OrderedDict[Key, bytes] = OrderedDict()
        self.uploads: OrderedDict[Key, bytes] = OrderedDict()
        self.dropped = 0
        self.endpoints = (upstream, credit)
        try:
            self.requests = self._socket(zmq.PULL, max_message)
            if upstream.identity:
                self.requests.setsockopt(zmq.IDENTITY, upstream.identity.encode())
            self.requests.connect(upstream.address)
            self.router = self._socket(zmq.ROUTER, max_message)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            try:
                self.router.bind(credit.address)
            except zmq.ZMQError as exc:
                raise UsageError(f"--credit {credit.address}: cannot bind: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _socket(self, kind: int, max_message: int) -> Any:
        sock = self.context.socket(kind)
        self.sockets.append(sock)
        sock.setsockopt(self.zmq.LINGER, LINGER_MS)
        sock.setsockopt(self.zmq.MAXMSGSIZE, max_message)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        if self.own_context:
            self.context.term()

    @property
    def credit(self) -> int:
        """Requests the handlers have asked for and not been given."""
        return sum(h.credit for h in self.handlers.values())

    def run(self, stopping: Callable[[], bool]) -> int:
        zmq = self.zmq
        log.info(
            "credit mode: requests from %s to the handlers that ask at %s (queue up to %d)",
            self.endpoints[0].address,
            self.endpoints[1].address,
            self.max_queue,
        )
        poller = zmq.Poller()
        poller.register(self.requests, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        while not stopping():
            self.step(common.POLL_MS, poller)
        self.finish(poller)
        log.info(
            "stopping; %s; %d queued, %d dropped",
            ", ".join(f"{h.identity.hex()}: {h.routed}" for h in self.handlers.values())
            or "no handler",
            len(self.queue),
            self.dropped,
        )
        return 0

    def finish(self, poller: Any) -> None:
        """Stopping: leave Mongrel2 (it gives new requests to other handlers, or holds
        them), and hand what reached us to the handlers as they ask, for up to
        ``drain_timeout`` seconds."""
        try:
            self.requests.disconnect(self.endpoints[0].address)
        except self.zmq.ZMQError:
            pass
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            if not self.queue and not self.requests.poll(0, self.zmq.POLLIN):
                return
            self.step(common.POLL_MS, poller)
        log.warning(
            "%d request(s) still waiting for a handler after %g s: dropped",
            len(self.queue),
            self.drain_timeout,
        )
        self.dropped += len(self.queue)

    def step(self, timeout_ms: int, poller: Any = None) -> None:
        """One round: wait up to ``timeout_ms`` for a message, handle what came."""
        zmq = self.zmq
        if poller is None:
            poller = zmq.Poller()
            poller.register(self.requests, zmq.POLLIN)
            poller.register(self.router, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        if self.router in ready:
            for _ in range(BATCH):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._from_handler(frames)
        if self.requests in ready:
            for _ in range(BATCH):
                try:
                    msg = self.requests.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._request(msg)

    # -- handlers --

    def _from_handler(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[-1]
        handler = self.handlers.get(identity)
        if len(frames) == 2 and body.startswith(b"READY "):
            count = body[6:]
            if count.isdigit() and 0 < len(count) <= 7 and 0 < int(count) <= CREDIT_MAX:
                if handler is None:
                    handler = self.handlers[identity] = Handler(identity)
                    log.info("handler %s connected", identity.hex())
                handler.credit = min(handler.credit + int(count), CREDIT_MAX)
                self._give(handler)
                return
        elif len(frames) == 2 and body == b"BYE":
            if handler is not None:
                self._forget(handler)
                log.info("handler %s leaves after %d request(s)", identity.hex(), handler.routed)
            try:
                self.router.send_multipart([identity, b"", b"BYE"], self.zmq.NOBLOCK)
            except self.zmq.ZMQError:
                pass  # gone already
            return
        log.warning("dropped a malformed message from handler %s", identity.hex())

    def _give(self, handler: Handler) -> None:
        """``handler`` has credit: the queue first, then it waits its turn."""
        while self.queue and handler.credit > 0 and handler.identity in self.handlers:
            msg, key, stage = self.queue.popleft()
            if not self._send_request(handler, msg, key, stage):
                self.queue.appendleft((msg, key, stage))
                return
        if handler.credit > 0 and not handler.queued_ready:
            handler.queued_ready = True
            self.ready.append(handler)

    def _forget(self, handler: Handler) -> None:
        handler.credit = 0
        self.handlers.pop(handler.identity, None)
        for table in (self.owners, self.uploads):
            for key in [k for k, ident in table.items() if ident == handler.identity]:
                del table[key]

    def _send_to(self, handler: Handler, msg: bytes) -> bool:
        """Send one request to ``handler`` (it has credit); False when it is gone."""
        zmq = self.zmq
        try:
            self.router.send_multipart([handler.identity, msg], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                log.warning("handler %s went away without a goodbye", handler.identity.hex())
            else:
                log.warning("handler %s takes no more: %s", handler.identity.hex(), exc)
            self._forget(handler)
            return False
        handler.credit -= 1
        handler.routed += 1
        return True

    # -- requests: Mongrel2 -> a handler with credit --

    def _request(self, msg: bytes) -> None:
        found = classify(msg)
        if found is None:
            return
        request, key, stage = found
        if request.is_disconnect:
            self.uploads.pop(key, None)
            self._to_owner(self.owners.pop(key, None), msg)
            return
        if stage == "done":
            owner = self.uploads.pop(key, None)
            if owner is not None:
                self._to_owner(owner, msg)
                return
        if self.queue or not self._dispatch(msg, key, stage):
            if len(self.queue) >= self.max_queue:
                self.dropped += 1
                log.warning(
                    "no handler asked for requests and %d wait already: one dropped (%d so far)",
                    len(self.queue),
                    self.dropped,
                )
                return
            self.queue.append((msg, key, stage))

    def _dispatch(self, msg: bytes, key: Key, stage: str | None) -> bool:
        """To the next handler with credit; False when none has any."""
        while self.ready:
            handler = self.ready.popleft()
            handler.queued_ready = False
            if handler.credit <= 0 or handler.identity not in self.handlers:
                continue
            if not self._send_request(handler, msg, key, stage):
                continue
            if handler.credit > 0:
                handler.queued_ready = True
                self.ready.append(handler)
            return True
        return False

    def _send_request(self, handler: Handler, msg: bytes, key: Key, stage: str | None) -> bool:
        if not self._send_to(handler, msg):
            return False
        self._remember(self.owners, key, handler.identity)
        if stage == "start":
            self._remember(self.uploads, key, handler.identity)
        return True

    def _to_owner(self, owner: bytes | None, msg: bytes) -> None:
        """A disconnect notice or an upload-done message: to the handler that has the
        connection, credit or not (it takes no task there); dropped when it left."""
        handler = self.handlers.get(owner) if owner is not None else None
        if handler is None:
            log.debug("message for a connection no live handler has: dropped")
            return
        try:
            self.router.send_multipart([handler.identity, msg], self.zmq.NOBLOCK)
        except self.zmq.ZMQError:
            self._forget(handler)
            return
        handler.credit -= 1  # the handler grants it back at once

    def _remember(self, table: OrderedDict[Key, bytes], key: Key, identity: bytes) -> None:
        remember(table, key, identity, self.max_connections)


# -- the command line --


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(
        "chaussette-dispatcher",
        "Route Mongrel2 requests to several handlers: sticky per connection or round robin.",
    )
    p.add_argument(
        "--zeromq",
        required=True,
        metavar="SEND_SPEC[,RECV_SPEC]",
        help="Mongrel2's send_spec and recv_spec (the dispatcher connects to them as a "
        "handler would); RECV_SPEC defaults to the next port down",
    )
    p.add_argument(
        "--credit",
        metavar="SPEC",
        help="credit mode: the endpoint to bind where handlers started with --m2-dispatcher "
        "connect and ask for requests (instead of --handlers and --replies)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        metavar="N",
        help="credit mode: requests waiting while no handler asked for one; beyond, they "
        f"are dropped ({MAX_QUEUE})",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT,
        metavar="SECONDS",
        help="credit mode: on SIGTERM, how long the requests that reached the dispatcher "
        f"wait for handlers to ask for them before they are dropped ({DRAIN_TIMEOUT:g})",
    )
    p.add_argument(
        "--handlers",
        action="append",
        metavar="SPEC[,SPEC...]",
        help="endpoints to bind, one slot each; handlers connect their PULL socket to one "
        "(repeatable)",
    )
    p.add_argument(
        "--replies",
        metavar="SPEC",
        help="endpoint to bind where handlers connect their PUB socket",
    )
    p.add_argument("--rule", choices=RULES, default="sticky", help="routing rule (sticky)")
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help=f"sticky table bound, least recently used out first ({MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--max-message",
        type=int,
        default=MAX_MESSAGE,
        metavar="BYTES",
        help=f"largest message accepted from Mongrel2 or a handler ({MAX_MESSAGE})",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        default=SEND_TIMEOUT,
        metavar="SECONDS",
        help=f"how long a request waits for a full slot before it is dropped ({SEND_TIMEOUT})",
    )
    return p


def run(args: argparse.Namespace, stopping: Callable[[], bool]) -> int:
    upstream = common.parse_pair(args.zeromq, "--zeromq")
    if args.credit:
        return run_credit(args, upstream[0], stopping)
    if not args.handlers or not args.replies:
        raise UsageError("give --handlers and --replies (or --credit, for credit mode)")
    handlers = [
        common.parse_endpoint(spec, "--handlers")
        for value in args.handlers
        for spec in value.split(",")
        if spec.strip()
    ]
    replies = common.parse_endpoint(args.replies, "--replies")
    if args.max_connections < 1 or args.max_message < 1 or args.send_timeout < 0:
        raise UsageError("--max-connections, --max-message: at least 1; --send-timeout: >= 0")
    dispatcher = Dispatcher(
        upstream,
        handlers,
        replies,
        rule=args.rule,
        max_connections=args.max_connections,
        max_message=args.max_message,
        send_timeout=args.send_timeout,
    )
    try:
        return dispatcher.run(stopping)
    finally:
        dispatcher.close()


def run_credit(args: argparse.Namespace, upstream: Endpoint, stopping: Callable[[], bool]) -> int:
    if args.handlers or args.replies:
        raise UsageError(
            "--credit replaces --handlers and --replies: handlers publish their replies to "
            "Mongrel2 themselves"
        )
    if args.max_queue < 0 or args.max_connections < 1 or args.max_message < 1:
        raise UsageError("--max-queue: at least 0; --max-connections, --max-message: at least 1")
    if args.drain_timeout < 0:
        raise UsageError("--drain-timeout: at least 0")
    dispatcher = CreditDispatcher(
        upstream,
        common.parse_endpoint(args.credit, "--credit"),
        max_queue=args.max_queue,
        max_connections=args.max_connections,
        max_message=args.max_message,
        drain_timeout=args.drain_timeout,
    )
    try:
        return dispatcher.run(stopping)
    finally:
        dispatcher.close()


def main(argv: Sequence[str] | None = None) -> int:
    return common.main("chaussette-dispatcher", build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
