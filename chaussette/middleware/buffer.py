"""Buffer: coalesce an application's small body chunks into bigger ones.

Plain WSGI (PEP 3333) middleware with no dependency on the rest of chaussette::

    from chaussette.middleware.buffer import BufferMiddleware
    application = BufferMiddleware(application, size=16384)

Why: an application (a template engine, a CSV writer) that yields many tiny strings costs
one server write -- one syscall, one FastCGI record, one ZeroMQ message, one HTTP chunk
with its framing -- per string. Buffered, it costs one per ``size`` bytes.

The trade-off: a small piece waits in the buffer until ``size`` bytes have gathered or the
body ends, so a slowly streamed response (server-sent events, progress lines) arrives late
and in lumps. For those, the application can say "send what you have now" by yielding an
empty bytestring: an empty chunk flushes the buffer. Rules it keeps:

- Chunks of at least ``size`` bytes pass through at once (after what was buffered before
  them, joined into the same output chunk); the buffer never holds ``size`` bytes or more.
- Order is kept between ``write()`` and the iterable; everything is flushed at the end.
- While it accumulates it yields an empty bytestring for each chunk it keeps (PEP 3333's
  rule for middleware: the server must get control back at each of the app's blocks).
- Responses the application gives as a ``wsgi.file_wrapper`` are passed through untouched
  (sendfile). The application's iterable is always closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

StartResponse = Callable[..., Callable[[bytes], Any]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType]

SIZE = 16 * 1024


class BufferMiddleware:
    """Wrap ``app`` so that its body goes out in chunks of about ``size`` bytes."""

    def __init__(self, app: WSGIApp, *, size: int = SIZE) -> None:
        if size < 1:
            raise ValueError(f"buffer size {size}: must be at least 1")
        self.app = app
        self.size = size

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        state = _Buffered(start_response, self.size)
        result = self.app(environ, state.start_response)
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(result, wrapper) and not state.pending:
            return result
        return _BufferedIterable(result, state)


class _Buffered:
    """The buffer of one response, shared by its write() and its iterable."""

    def __init__(self, start_response: StartResponse, size: int) -> None:
        self.upstream = start_response
        self.size = size
        self.pending = bytearray()
        self.write_upstream: Callable[[bytes], Any] | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], Any]:
        if exc_info is not None:
            self.write_upstream = self.upstream(status, headers, exc_info)
            # the error page replaces the response: what the app had buffered is not part of it
            self.pending.clear()
        else:
            self.write_upstream = self.upstream(status, headers)
        return self.write

    def add(self, data: bytes) -> bytes:
        """The bytes to send now for ``data`` (b"" while accumulating; an empty ``data``
        flushes)."""
        if not data:
            return self.take()
        if not self.pending and len(data) >= self.size:
            return data  # no copy for big chunks
        self.pending += data
        if len(self.pending) >= self.size:
            return self.take()
        return b""

    def take(self) -> bytes:
        out = bytes(self.pending)
        self.pending.clear()
        return out

    def write(self, data: bytes) -> None:
        if self.write_upstream is None:
            raise AssertionError("write() before start_response()")
        out = self.add(data) if data else b""
        if out:
            self.write_upstream(out)


class _BufferedIterable:
    def __init__(self, result: Iterable[bytes], state: _Buffered) -> None:
        self.result = result
        self.state = state

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.result:
            yield self.state.add(chunk)
        rest = self.state.take()
        if rest:
            yield rest

    def close(self) -> None:
        close = getattr(self.result, "close", None)
        if close is not None:
            close()
