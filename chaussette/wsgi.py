"""The one WSGI host used by chaussette's own servers (the wsgiref backend now; FastCGI,
SCGI and Mongrel2 later).

Rules it keeps (PEP 3333):

- ``start_response`` is strict: a status is ``"NNN Reason"``, headers are a list of
  ``(str, str)`` pairs of latin-1 text with no CR/LF (no header injection), no hop-by-hop
  header comes from the app, and a second call needs ``exc_info``.
- Headers go out with the first non-empty body chunk (or at the end), so a 500 can still
  replace them if the app fails before producing any body.
- A list/tuple result without Content-Length gets one computed.
- The iterable's ``close()`` is always called, whatever happened.
- An app error before headers are sent gives a 500; after, the response is aborted
  (the sink closes the connection without completing the framing) and the traceback logged.
- A client that went away (``OSError`` from the sink) ends the request quietly.

The protocol side is a ``Sink``: it turns status/headers/body into bytes on its wire.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, BinaryIO, Protocol
from wsgiref.util import FileWrapper

log = logging.getLogger("chaussette")
app_errors = logging.getLogger("chaussette.app")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType]
WSGIApp = Callable[..., Iterable[bytes]]

HOP_BY_HOP = frozenset(
    (
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade",
    )
)
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

ERROR_BODY = b"Internal Server Error\n"


class Sink(Protocol):
    """The protocol side of a response."""

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send the status and headers, with the first body bytes when there are some."""

    def send_body(self, data: bytes) -> None:
        """Send more body bytes (never empty)."""

    def send_file(self, file: BinaryIO, count: int | None) -> int | None:
        """Send a file's bytes from its current position; None when the sink cannot."""

    def finish(self) -> None:
        """The response is complete."""

    def abort(self) -> None:
        """The response cannot be completed: make the peer see it as cut."""


class ClientGone(Exception):
    """The peer went away while we were writing."""


class BodyTruncated(ClientGone, ConnectionError):
    """The client stopped sending before the end of its body, or framed it wrongly.

    Raised from ``wsgi.input``; if the app lets it through, the request ends quietly."""


class ErrorStream:
    """``wsgi.errors``: lines written by the app go to the ``chaussette.app`` logger."""

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            app_errors.error("%s", line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._partial:
            app_errors.error("%s", self._partial)
            self._partial = ""


class BodyReader:
    """``wsgi.input`` over a ``read_some(n) -> bytes`` source ('' means end of body).

    ``read_some`` returns at most n bytes and blocks only until some are there, so an app
    reading in chunks streams. ``before_first_read`` runs once (100-continue).
    """

    def __init__(
        self,
        read_some: Callable[[int], bytes],
        before_first_read: Callable[[], None] | None = None,
    ) -> None:
        self._read_some = read_some
        self._buffer = b""
        self._eof = False
        self._before = before_first_read

    def _fill(self, want: int) -> bytes:
        if self._before is not None:
            before, self._before = self._before, None
            before()
        if self._eof:
            return b""
        data = self._read_some(max(want, 8192))
        if not data:
            self._eof = True
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buffer]
            self._buffer = b""
            while chunk := self._fill(65536):
                parts.append(chunk)
            return b"".join(parts)
        while len(self._buffer) < size:
            chunk = self._fill(size - len(self._buffer))
            if not chunk:
                break
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = sys.maxsize if size is None or size < 0 else size
        while True:
            end = self._buffer.find(b"\n", 0, limit)
            if end >= 0:
                end += 1
                break
            if len(self._buffer) >= limit:
                end = limit
                break
            chunk = self._fill(8192)
            if not chunk:
                end = len(self._buffer)
                break
            self._buffer += chunk
        line, self._buffer = self._buffer[:end], self._buffer[end:]
        return line

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


def check_status(status: object) -> int:
    if not isinstance(status, str):
        raise TypeError(f"status must be a str, got {type(status).__name__}")
    code, _, reason = status.partition(" ")
    if len(code) != 3 or not code.isdigit() or not reason or "\r" in status or "\n" in status:
        raise ValueError(f"status must look like '200 OK', got {status!r}")
    return int(code)


def check_headers(headers: object) -> list[tuple[str, str]]:
    if type(headers) is not list:
        raise TypeError(f"headers must be a list, got {type(headers).__name__}")
    for item in headers:
        if type(item) is not tuple or len(item) != 2:
            raise TypeError(f"each header must be a (name, value) tuple, got {item!r}")
        name, value = item
        if type(name) is not str or type(value) is not str:
            raise TypeError(f"header names and values must be str, got {item!r}")
        try:
            raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"header not encodable as latin-1: {item!r}") from None
        if not raw_name or not set(raw_name) <= _TOKEN_CHARS:
            raise ValueError(f"invalid header name {name!r}")
        if b"\r" in raw_value or b"\n" in raw_value or b"\0" in raw_value:
            raise ValueError(f"header value of {name!r} contains CR, LF or NUL")
        if name.lower() in HOP_BY_HOP:
            raise ValueError(f"hop-by-hop header {name!r} is the server's to set")
    return headers


class Response:
    """Runs one WSGI call against a sink. ``run`` returns when the response is done."""

    def __init__(self, app: WSGIApp, environ: dict[str, Any], sink: Sink) -> None:
        self.app = app
        self.environ = environ
        self.sink = sink
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.headers_sent = False
        self.status_code = 0
        self.body_bytes = 0
        self.failed = False  # the app raised
        self.client_gone = False

    # -- the app-facing callables --

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called a second time without exc_info")
        code = check_status(status)
        self.headers = check_headers(headers)
        self.status, self.status_code = status, code
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy ``write`` callable returned by ``start_response``."""
        if type(data) is not bytes:
            raise TypeError(f"the app must write bytes, got {type(data).__name__}")
        self._send(data)

    # -- driving --

    def run(self) -> None:
        result: Iterable[bytes] | None = None
        try:
            result = self.app(self.environ, self.start_response)
            self._iterate(result)
            if not self.headers_sent:
                self._send_headers(b"", final=True)
            self.sink.finish()
        except ClientGone as exc:
            self.client_gone = True
            log.info("client went away (%s %s): %s", self.environ.get("REQUEST_METHOD"),
                     self.environ.get("PATH_INFO"), exc.__cause__ or exc)
        except Exception:
            self.failed = True
            self._handle_error(sys.exc_info())
        finally:
            if result is not None:
                self._close(result)

    def _iterate(self, result: Iterable[bytes]) -> None:
        if isinstance(result, FileWrapper) and self._try_sendfile(result):
            return
        if isinstance(result, (list, tuple)) and not self.headers_sent and self.status:
            if not any(n.lower() == "content-length" for n, _ in self.headers):
                chunks = list(result)
                for chunk in chunks:
                    self._check_chunk(chunk)
                body = b"".join(chunks)
                self.headers.append(("Content-Length", str(len(body))))
                self._send_headers(body, final=True)
                return
        for chunk in result:
            self._check_chunk(chunk)
            if chunk:
                self._send(chunk)

    @staticmethod
    def _check_chunk(chunk: object) -> None:
        if type(chunk) is not bytes:
            raise TypeError(f"the app's iterable must yield bytes, got {type(chunk).__name__}")

    def _try_sendfile(self, wrapper: FileWrapper) -> bool:
        file = wrapper.filelike
        try:
            file.fileno()
        except (AttributeError, OSError, ValueError):
            return False
        if not self.headers_sent:
            self._send_headers(b"", final=False)
        try:
            sent = self.sink.send_file(file, None)
        except OSError as exc:
            raise ClientGone() from exc
        if sent is None:
            return False
        self.body_bytes += sent
        return True

    def _send(self, data: bytes) -> None:
        if self.status is None:
            raise AssertionError("the app sent body bytes before calling start_response")
        try:
            if not self.headers_sent:
                self._send_headers(data, final=False)
            else:
                self.sink.send_body(data)
        except OSError as exc:
            raise ClientGone() from exc
        self.body_bytes += len(data)

    def _send_headers(self, body: bytes, final: bool) -> None:
        if self.status is None:
            raise AssertionError("the app returned without calling start_response")
        headers = self.headers
        if final and not any(n.lower() == "content-length" for n, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        self.headers_sent = True
        try:
            self.sink.send_headers(self.status, headers, body)
        except OSError as exc:
            raise ClientGone() from exc
        if final:
            self.body_bytes += len(body)

    def _handle_error(self, exc_info: Any) -> None:
        if self.headers_sent:
            log.error(
                "app failed after the response started (%s %s): connection cut",
                self.environ.get("REQUEST_METHOD"), self.environ.get("PATH_INFO"),
                exc_info=exc_info,
            )
            try:
                self.sink.abort()
            except OSError:
                pass
            return
        log.error(
            "app failed (%s %s): answered 500",
            self.environ.get("REQUEST_METHOD"), self.environ.get("PATH_INFO"),
            exc_info=exc_info,
        )
        self.status, self.status_code = "500 Internal Server Error", 500
        self.headers = [("Content-Type", "text/plain; charset=utf-8")]
        try:
            self._send_headers(ERROR_BODY, final=True)
            self.sink.finish()
        except (ClientGone, OSError):
            self.client_gone = True

    def _close(self, result: Iterable[bytes]) -> None:
        close = getattr(result, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:
            log.exception("the app iterable's close() raised")
