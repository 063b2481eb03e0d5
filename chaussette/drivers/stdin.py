"""The request body between the connection reader and the app (``wsgi.input``).

A ``StdinBuffer`` is fed by the task that reads the connection and read by the task that
runs the app, so that the app starts before the body has all arrived and a read blocks only
until some bytes are there. What is buffered but not yet read is bounded twice: per request
(``limit``, 256 KiB) and per connection over all its requests (a ``BodyBudget``, 1 MiB:
FastCGI multiplexes, so without it one peer could park ``--max-reqs`` x 256 KiB). Over
either bound the connection's reader waits (``BodyBudget.wait``) until an app reads or a
request ends, and meanwhile reads nothing more from its connection: the backpressure.

No deadlock: a request whose app waits for its own body must get it, but its bytes may sit
behind other requests' bytes in the connection. While an app waits for its body
(``hungry``) the reader reads on past both bounds, up to the budget's hard cap (2 MiB);
there, bytes the apps do not read are the peer's problem, and the wait ends after
``--timeout`` with the connection closed.

Without a reader task (the ``single`` model, SCGI), ``pump`` is called instead of waiting:
it reads the connection once and feeds the buffer itself; no budget is needed (only the
app's own reads make the connection be read).

``fed`` is written by the producer only and ``taken`` by the consumer only. The flag the
consumer waits on is made only when it must wait (most requests never do): it makes its
flag, then checks again, and the producer sets the flag only once it exists, after its own
change. The budget's count is changed under its lock (none under greenlets).

When the connection's reader is itself busy running this request (see ``starve``), a read
that has to wait first calls ``starve`` so that someone reads the connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from chaussette.drivers.engine import Flag
from chaussette.wsgi import BodyTruncated

STDIN_LIMIT = 256 * 1024  # body bytes buffered per request before the reader waits
CONN_BUDGET = 1 << 20  # body bytes buffered per connection (all its requests) likewise
HARD_CAP = 2 * CONN_BUDGET  # how far the reader goes on while an app waits for its body


class BodyBudget:
    """The body bytes buffered and not read yet over all the requests of one connection.

    The reader calls ``wait`` before each read of the connection; apps reading (``took``),
    requests ending (``dropped``) and apps waiting for their body (``hungry``) wake it."""

    __slots__ = (
        "flag",
        "hard",
        "limit",
        "lock",
        "paused",
        "starving",
        "stopped",
        "unread",
        "wake",
    )

    def __init__(
        self,
        flag: Callable[[], Flag],
        lock: AbstractContextManager[Any],
        limit: int = CONN_BUDGET,
        hard: int = HARD_CAP,
    ) -> None:
        self.flag = flag
        self.lock = lock
        self.limit = limit
        self.hard = hard
        self.unread = 0
        self.starving: set[StdinBuffer] = set()  # add/discard are atomic
        self.paused = False  # the reader waits on ``wake``
        self.stopped = False  # the connection is closing: never wait
        self.wake: Flag | None = None

    def blocked(self, full: StdinBuffer | None) -> bool:
        """True when the reader must not read now: over the budget, or ``full`` (the last
        request fed) over its own limit, unless an app waits for its body (below the cap)."""
        if self.stopped:
            return False
        if self.unread < self.limit and (
            full is None or full.closed or full.fed - full.taken < full.limit
        ):
            return False
        return not (self.starving and self.unread < self.hard)

    def wait(self, full: StdinBuffer | None, timeout: float | None) -> bool:
        """Wait until the reader may read; False when nothing changed for ``timeout``."""
        while self.blocked(full):
            wake = self.wake
            if wake is None:
                wake = self.wake = self.flag()
            wake.clear()
            self.paused = True
            try:
                if not self.blocked(full):
                    break
                if not wake.wait(timeout):
                    return False
            finally:
                self.paused = False
        return True

    def took(self, count: int) -> None:
        """An app read ``count`` bytes, or a request ended with ``count`` unread."""
        with self.lock:
            self.unread -= count
        self._wake()

    def hungry(self, buffer: StdinBuffer) -> None:
        """``buffer``'s app waits for body bytes."""
        self.starving.add(buffer)
        self._wake()

    def stop(self) -> None:
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        if self.paused:
            wake = self.wake
            if wake is not None:
                wake.set()


class StdinBuffer:
    __slots__ = (
        "budget",
        "chunks",
        "closed",
        "eof",
        "error",
        "expected",
        "fed",
        "flag",
        "limit",
        "logged",
        "overread",
        "pump",
        "readable",
        "short",
        "starve",
        "taken",
        "timeout",
    )

    def __init__(
        self,
        flag: Callable[[], Flag] | None,
        timeout: float | None,
        pump: Callable[[], None] | None = None,
        limit: int = STDIN_LIMIT,
        budget: BodyBudget | None = None,
    ) -> None:
        self.chunks: deque[bytes] = deque()
        self.fed = 0
        self.taken = 0
        self.eof = False
        self.error: str | None = None
        self.closed = False  # the request ended: nothing will read any more
        self.flag = flag  # makes the flag below, when the consumer must wait
        self.readable: Flag | None = None  # set by the producer, waited on by the consumer
        self.starve: Callable[[], None] | None = None
        self.timeout = timeout
        self.pump = pump
        self.limit = limit
        self.budget = budget
        self.expected: int | None = None  # CONTENT_LENGTH, when the protocol does not check it
        self.short = False  # the body ended before ``expected``
        self.overread = False  # ... and the app read past its end (it got BodyTruncated)
        self.logged = False  # the cause of ``error`` is logged already

    # -- the producer (the connection reader) --

    def feed(self, data: bytes) -> bool:
        """Append body bytes; True when this request's buffer is full (its own limit)."""
        budget = self.budget
        if budget is None:
            if self.closed:
                return False
            self.chunks.append(data)
            self.fed += len(data)
        else:
            with budget.lock:  # against ``close`` counting what it drops
                if self.closed:
                    return False
                self.chunks.append(data)
                self.fed += len(data)
                budget.unread += len(data)
        if self.readable is not None:
            self.readable.set()
        return self.fed - self.taken >= self.limit

    def end(self) -> bool:
        """The peer ended the body; False when it is shorter than ``expected``: reading
        past what came then raises ``BodyTruncated`` (and sets ``overread``). The caller
        logs the reason (``error``)."""
        if self.expected is not None and self.fed < self.expected and self.error is None:
            self.short = True
            reason = f"body ended after {self.fed} of {self.expected} bytes (CONTENT_LENGTH)"
            self.fail(reason, logged=True)
            return False
        self.eof = True
        if self.readable is not None:
            self.readable.set()
        return True

    def fail(self, reason: str, logged: bool = False) -> None:
        """The body will never be complete (peer gone, request aborted, body short);
        ``logged``: the caller logged ``reason`` (the app's BodyTruncated says so)."""
        if self.error is None:
            self.error = reason
            self.logged = logged
        if self.readable is not None:
            self.readable.set()

    def close(self) -> None:
        """The request ended: drop what is left (and give it back to the budget)."""
        budget = self.budget
        if budget is None:
            self.closed = True
            self.chunks.clear()
            return
        with budget.lock:
            self.closed = True
            dropped = self.fed - self.taken
            self.chunks.clear()
        if dropped:
            budget.took(dropped)

    # -- the consumer (the app, through BodyReader) --

    def read_some(self, size: int) -> bytes:
        """At most ``size`` bytes, waiting only until some are there; b"" at the end."""
        chunks = self.chunks
        while True:
            if chunks:
                data = chunks[0]
                if len(data) <= size:
                    chunks.popleft()
                else:
                    chunks[0] = data[size:]
                    data = data[:size]
                self.taken += len(data)
                if self.budget is not None:
                    self.budget.took(len(data))
                return data
            if self.error is not None:
                self.overread = self.short
                exc = BodyTruncated(self.error)
                exc.logged = self.logged
                raise exc
            if self.eof:
                return b""
            if self.pump is not None:
                self.pump()
                continue
            if self.starve is not None:
                self.starve()
            readable = self.readable
            if readable is None:
                assert self.flag is not None
                readable = self.readable = self.flag()
            readable.clear()
            if chunks or self.eof or self.error is not None:
                continue
            budget = self.budget
            if budget is not None:
                budget.hungry(self)
            try:
                got = readable.wait(self.timeout)
            finally:
                if budget is not None:
                    budget.starving.discard(self)
            if not got:
                raise BodyTruncated(f"no request body bytes for {self.timeout} s")
