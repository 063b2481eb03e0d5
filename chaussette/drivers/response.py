"""How the drivers run a WSGI response: chaussette.wsgi.Response, with output coalesced.

A driver's sink buffers what the response produces (``pending``) and writes it with
``flush``. The status and headers wait for the body; a list body, the headers and the end
of the request then leave in ONE write. For any other iterable the buffer is flushed
before each call into the app's iterator (which may block) and after each chunk, so a
streamed response goes out piece by piece; the legacy ``write()`` flushes too.

``SteppedResponse`` splits ``run`` in two for the ``rplex`` model: ``call`` (the app call,
in a worker thread) and ``step`` (one chunk, in the one writer thread).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol
from wsgiref.util import FileWrapper

from chaussette.wsgi import ClientGone, Response, Sink, log


class BufferedSink(Sink, Protocol):
    def flush(self) -> None:
        """Write what is buffered."""


class _FlushBefore:
    """The app's iterator, with the sink flushed before each step into it."""

    __slots__ = ("flush", "it")

    def __init__(self, result: Iterable[bytes], flush: Any) -> None:
        self.it = iter(result)
        self.flush = flush

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        self.flush()
        return next(self.it)


class BufferedResponse(Response):
    sink: BufferedSink

    def _iterate(self, result: Iterable[bytes]) -> None:
        if isinstance(result, (list, tuple, FileWrapper)):
            super()._iterate(result)
        else:
            super()._iterate(_FlushBefore(result, self._flush))

    def write(self, data: bytes) -> None:
        super().write(data)
        self._flush()

    def _flush(self) -> None:
        self._sink_call(self.sink.flush)


class SteppedResponse(BufferedResponse):
    """A response iterated one chunk at a time by someone else than its caller."""

    result: Iterable[bytes] | None = None
    iterator: Iterator[bytes] | None = None

    def call(self) -> bool:
        """Call the app. True when there is an iterable left to ``step`` through; False
        when the response is already complete (a list body, an error, a client gone)."""
        try:
            self.result = self.app(self.environ, self.start_response)
            if isinstance(self.result, (list, tuple, FileWrapper)):
                self._iterate(self.result)
                self._complete()
                self._done()
                return False
            self.iterator = iter(self.result)
            return True
        except BaseException as exc:
            self._caught(exc)
            return False

    def step(self) -> bool:
        """Send the next chunk; False when the response is complete."""
        assert self.iterator is not None
        try:
            try:
                chunk = next(self.iterator)
            except StopIteration:
                self._complete()
                self._done()
                return False
            self._check_chunk(chunk)
            if chunk:
                self._send(chunk)
                self._flush()
            if self.length is not None and self.body_bytes >= self.length:
                self._complete()
                self._done()
                return False
            return True
        except BaseException as exc:
            self._caught(exc)
            return False

    def _caught(self, exc: BaseException) -> None:
        if isinstance(exc, ClientGone):
            self.client_gone = True
            if not exc.logged:
                log.info(
                    "client went away (%s %s): %s",
                    self.environ.get("REQUEST_METHOD"),
                    self.environ.get("PATH_INFO"),
                    exc.__cause__ or exc,
                )
        elif isinstance(exc, Exception):
            self.failed = True
            self._handle_error(sys.exc_info())
        self._done()
        if not isinstance(exc, Exception):
            raise exc

    def _done(self) -> None:
        result, self.result, self.iterator = self.result, None, None
        if result is not None:
            self._close(result)
