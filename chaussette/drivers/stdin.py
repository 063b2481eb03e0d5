"""The request body between the connection reader and the app (``wsgi.input``).

A ``StdinBuffer`` is fed by the task that reads the connection and read by the task that
runs the app, so that the app starts before the body has all arrived and a read blocks only
until some bytes are there. What is buffered but not yet read is bounded (``limit``): a
reader that fills it waits (``wait_room``) until the app reads, and meanwhile reads nothing
more from its connection. That is the backpressure.

Without a reader task (the ``single`` model, SCGI), ``pump`` is called instead of waiting:
it reads the connection once and feeds the buffer itself.

Each side writes only its own counter (``fed`` by the producer, ``taken`` by the consumer),
so their difference is safe to read from both without a lock. The flags a side waits on
are made only when it must wait (most requests never do): a side makes its flag, then
checks again, and the other side sets a flag only once it exists, after its own change.

When the connection's reader is itself busy running this request (see ``starve``), a read
that has to wait first calls ``starve`` so that someone reads the connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from chaussette.drivers.engine import Flag
from chaussette.wsgi import BodyTruncated

STDIN_LIMIT = 256 * 1024  # body bytes buffered per request before the reader waits


class StdinBuffer:
    __slots__ = (
        "chunks",
        "closed",
        "eof",
        "error",
        "fed",
        "flag",
        "limit",
        "pump",
        "readable",
        "room",
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
    ) -> None:
        self.chunks: deque[bytes] = deque()
        self.fed = 0
        self.taken = 0
        self.eof = False
        self.error: str | None = None
        self.closed = False  # the request ended: nothing will read any more
        self.flag = flag  # makes the flags below, when a side must wait
        self.readable: Flag | None = None  # set by the producer, waited on by the consumer
        self.room: Flag | None = None  # set by the consumer, waited on by the producer
        self.starve: Callable[[], None] | None = None
        self.timeout = timeout
        self.pump = pump
        self.limit = limit

    # -- the producer (the connection reader) --

    def feed(self, data: bytes) -> bool:
        """Append body bytes; True when the buffer is full (call ``wait_room``)."""
        if self.closed:
            return False
        self.chunks.append(data)
        self.fed += len(data)
        if self.readable is not None:
            self.readable.set()
        return self.fed - self.taken >= self.limit

    def wait_room(self) -> bool:
        """Wait until the app has read enough (or the request ended); False on timeout."""
        if self.flag is None:
            return True  # the consumer reads for itself (pump)
        while self.fed - self.taken >= self.limit and not self.closed:
            room = self.room
            if room is None:
                room = self.room = self.flag()
            room.clear()
            if self.fed - self.taken < self.limit or self.closed:
                break
            if not room.wait(self.timeout):
                return False
        return True

    def end(self) -> None:
        """The body is complete."""
        self.eof = True
        if self.readable is not None:
            self.readable.set()

    def fail(self, reason: str) -> None:
        """The body will never be complete (peer gone, request aborted)."""
        if self.error is None:
            self.error = reason
        if self.readable is not None:
            self.readable.set()

    def close(self) -> None:
        """The request ended: drop what is left and free a producer waiting for room."""
        self.closed = True
        self.chunks.clear()
        if self.room is not None:
            self.room.set()

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
                if self.room is not None and self.fed - self.taken < self.limit:
                    self.room.set()
                return data
            if self.error is not None:
                raise BodyTruncated(self.error)
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
            if not readable.wait(self.timeout):
                raise BodyTruncated(f"no request body bytes for {self.timeout} s")
