"""The raw handler API: for code that speaks CGI itself rather than WSGI.

With ``--raw-handler``, APP is called once per request with a ``RawRequest``:

- ``environ``: the CGI parameters (a dict of str), plus ``wsgi.input`` (the same object as
  ``stdin``) and the defaults the WSGI environ gets;
- ``stdin``: the request body, file-like (``read``, ``readline``, iteration), streamed;
- ``stdout``: ``write(bytes)`` a CGI response: a ``Status:`` line and headers, a blank
  line, the body. Written bytes are buffered (up to 64 KiB); ``flush()`` sends them now;
- ``stderr``: ``write(bytes or str)`` goes to the FastCGI STDERR stream and to the log.

What the handler returns, if an int, is the FastCGI application status (0 otherwise). If it
raises before writing anything, the peer gets a 500; after, the response is cut.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from chaussette.wsgi import BodyReader, ClientGone

log = logging.getLogger("chaussette")
app_errors = logging.getLogger("chaussette.app")

FLUSH_AT = 65536  # bytes buffered by stdout.write before they are sent
ERROR_RESPONSE = (
    b"Status: 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 22\r\n\r\nInternal Server Error\n"
)


class RawSink(Protocol):
    pending: list[bytes]

    def raw(self, data: bytes) -> None:
        """Buffer response bytes as they are."""

    def stderr(self, data: bytes) -> None:
        """Buffer bytes for the error stream."""

    def flush(self) -> None:
        """Write what is buffered."""

    def abort(self) -> None:
        """The response cannot be completed."""


class RawOutput:
    """``request.stdout``."""

    def __init__(self, sink: RawSink) -> None:
        self._sink = sink
        self.buffered = 0
        self.written = 0

    def write(self, data: bytes) -> int:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"stdout takes bytes, got {type(data).__name__}")
        if data:
            self._sink.raw(bytes(data))
            self.buffered += len(data)
            self.written += len(data)
            if self.buffered >= FLUSH_AT:
                self.flush()
        return len(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.buffered = 0
        self._sink.flush()


class RawErrors:
    """``request.stderr``: to the protocol's error stream and the ``chaussette.app`` log."""

    def __init__(self, sink: RawSink) -> None:
        self._sink = sink

    def write(self, data: bytes | str) -> int:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
        if raw:
            self._sink.stderr(raw)
            for line in text.splitlines():
                if line.strip():
                    app_errors.error("%s", line)
        return len(data)

    def flush(self) -> None:
        self._sink.flush()


class RawRequest:
    """What a raw handler receives."""

    __slots__ = ("environ", "stderr", "stdin", "stdout")

    def __init__(self, environ: dict[str, Any], stdin: BodyReader, sink: RawSink) -> None:
        self.environ = environ
        self.stdin = stdin
        self.stdout = RawOutput(sink)
        self.stderr = RawErrors(sink)


def run_raw(handler: Callable[[RawRequest], Any], request: RawRequest, sink: RawSink) -> int:
    """Call the handler; returns the application status."""
    environ = request.environ
    where = (environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
    try:
        status = handler(request)
        request.stdout.flush()
    except ClientGone as exc:
        if not exc.logged:
            log.info("client went away (%s %s): %s", *where, exc.__cause__ or exc)
        return 1
    except OSError as exc:  # from flush: the peer went away
        log.info("client went away (%s %s): %s", *where, exc)
        return 1
    except Exception:
        if request.stdout.written:
            log.exception("raw handler failed after its response started (%s %s): cut", *where)
            sink.abort()
        else:
            log.exception("raw handler failed (%s %s): answered 500", *where)
            sink.pending.clear()
            sink.raw(ERROR_RESPONSE)
        return 1
    return status if type(status) is int else 0
