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
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
        try:
            request = mongrel2.parse_request(msg)
        except RemoteProtocolError as exc:
            log.warning("dropped a malformed message from Mongrel2: %s", exc)
            return
        key = (request.sender, request.conn_id)
        if request.is_disconnect:
            targets = self._disconnect_targets(key)
            if not targets:
                log.debug("disconnect of unknown connection %s %s dropped", *key)
            for target in targets:
                self._send(target, msg, fallback=False)
            return
        slot = self._choose(key, request)
        if slot is not None:
            self._send(slot, msg, fallback=self.rule == "round-robin")

    def _choose(self, key: Key, request: mongrel2.Request) -> Slot | None:
        try:
            stage = mongrel2.upload_stage(request)
        except mongrel2.UploadError:
            stage = None  # forged by the client: the handler answers 400 wherever it lands
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
        table[key] = slot
        table.move_to_end(key)
        while len(table) > self.max_connections:
            table.popitem(last=False)

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
        "--handlers",
        required=True,
        action="append",
        metavar="SPEC[,SPEC...]",
        help="endpoints to bind, one slot each; handlers connect their PULL socket to one "
        "(repeatable)",
    )
    p.add_argument(
        "--replies",
        required=True,
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


def main(argv: Sequence[str] | None = None) -> int:
    return common.main("chaussette-dispatcher", build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
