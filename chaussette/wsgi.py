"""The one WSGI host used by chaussette's own servers (the wsgiref backend now; FastCGI,
SCGI and Mongrel2 later).

Rules it keeps (PEP 3333):

- ``start_response`` is strict: a status is ``"NNN Reason"``, headers are a list of
  ``(str, str)`` pairs of latin-1 text with no CR/LF (no header injection), no hop-by-hop
  header comes from the app, and a second call needs ``exc_info``.
- Headers go out with the first non-empty body chunk (or at the end), so a 500 can still
  replace them if the app fails before producing any body.
- A list/tuple result without Content-Length gets one computed. No more body bytes than
  the app's own Content-Length go out; fewer make the response cut, not complete.
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
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)

ERROR_BODY = b"Internal Server Error\n"


class Sink(Protocol):
    """The protocol side of a response."""

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send the status and headers, with the first body bytes when there are some."""

    def send_body(self, data: bytes) -> None:
        """Send more body bytes (never empty)."""

    def send_file(self, file: BinaryIO, count: int | None) -> int | None:
        """Send a file's bytes from its current position (all of them, or ``count``);
        returns how many, or None when the sink cannot (nothing was sent then)."""

    def finish(self) -> None:
        """The response is complete."""

    def abort(self) -> None:
        """The response cannot be completed: make the peer see it as cut."""


class ClientGone(Exception):
    """The peer went away while we were writing."""

    logged = False  # the server logged the cause already: the response adds no line


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
    """``wsgi.input`` over a ``read_some(n) -> bytes`` source (b"" means end of body).

    ``read_some`` returns at most n bytes and blocks only until some are there, so an app
    reading in chunks streams. ``before_first_read`` runs once (100-continue). The buffer
    is a bytearray consumed from the front, and ``readline`` never rescans bytes it has
    seen: a long body costs linear time whatever the app's read sizes.
    """

    def __init__(
        self,
        read_some: Callable[[int], bytes],
        before_first_read: Callable[[], None] | None = None,
    ) -> None:
        self._read_some = read_some
        self._buffer = bytearray()
        self._eof = False
        self._before = before_first_read

    def _next(self, want: int) -> bytes:
        """The source's next bytes (at most ``want``); b"" at the end."""
        if self._before is not None:
            before, self._before = self._before, None
            before()
        if self._eof:
            return b""
        data = self._read_some(want)
        if not data:
            self._eof = True
        return data

    def _fill(self, want: int) -> bool:
        """Append what the source has (at least ``want`` is asked); False at the end."""
        data = self._next(max(want, 8192))
        if not data:
            return False
        self._buffer += data
        return True

    def _take(self, size: int) -> bytes:
        buffer = self._buffer
        if size >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
            return data
        with memoryview(buffer) as view:  # one copy (a slice of the bytearray is two)
            data = view[:size].tobytes()
        del buffer[:size]  # from the front: CPython moves the start, not the bytes
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill(65536):
                pass
            return self._take(len(self._buffer))
        if size >= 8192 and not self._buffer:
            return self._read_direct(size)
        while len(self._buffer) < size and self._fill(size - len(self._buffer)):
            pass
        return self._take(size)

    def _read_direct(self, size: int) -> bytes:
        """``read(size)`` with nothing buffered: the source's bytes are returned as they
        came (joined once if they came in pieces), never copied through the buffer."""
        data = self._next(size)
        if len(data) == size:  # the common case: one piece, exactly the size asked
            return data
        pieces = [data]
        left = size - len(data)
        try:
            while left > 0 and data:
                data = self._next(left)
                pieces.append(data)
                left -= len(data)
        except BaseException:
            self._buffer += b"".join(pieces)  # kept, as the buffered path would keep them
            raise
        if left < 0:  # a source that gave more than asked: keep the rest for later
            whole = b"".join(pieces)
            self._buffer += memoryview(whole)[size:]
            return whole[:size]
        return b"".join(pieces)

    def readline(self, size: int | None = -1) -> bytes:
        limit = sys.maxsize if size is None or size < 0 else size
        scanned = 0
        while True:
            end = self._buffer.find(b"\n", scanned, limit)
            if end >= 0:
                return self._take(end + 1)
            if len(self._buffer) >= limit:
                return self._take(limit)
            scanned = len(self._buffer)
            if not self._fill(8192):
                return self._take(len(self._buffer))

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


# Statuses and header names already found valid (bounded: an app making up new ones each
# time only misses the cache). A hit skips the checks; hop-by-hop names are never cached.
_CACHE_SIZE = 512
_good_statuses: dict[str, int] = {}
_good_names: dict[str, bool] = {}  # valid, non-hop-by-hop name -> it is Content-Length


def check_status(status: object) -> int:
    if type(status) is str:
        code = _good_statuses.get(status)
        if code is not None:
            return code
    if not isinstance(status, str):
        raise TypeError(f"status must be a str, got {type(status).__name__}")
    code_text, _, reason = status.partition(" ")
    if (
        len(code_text) != 3
        or not (code_text.isascii() and code_text.isdigit())
        or code_text[0] == "0"
        or not reason
        or any(c in reason for c in "\r\n\0")
    ):
        raise ValueError(f"status must look like '200 OK', got {status!r}")
    try:
        reason.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"status not encodable as latin-1: {status!r}") from None
    code = int(code_text)
    if type(status) is str and len(_good_statuses) < _CACHE_SIZE:
        _good_statuses[status] = code
    return code


def _check_name(name: str) -> bool:
    """Check a header name not seen yet; True when it is Content-Length."""
    try:
        raw_name = name.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"header name not encodable as latin-1: {name!r}") from None
    if not raw_name or not set(raw_name) <= _TOKEN_CHARS:
        raise ValueError(f"invalid header name {name!r}")
    lower = name.lower()
    if lower in HOP_BY_HOP:
        raise ValueError(f"hop-by-hop header {name!r} is the server's to set")
    is_length = lower == "content-length"
    if len(_good_names) < _CACHE_SIZE:
        _good_names[name] = is_length
    return is_length


def _check_value(name: str, value: str) -> None:
    """The slow check of a header value that is not plain printable ASCII."""
    try:
        raw_value = value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"header value of {name!r} not encodable as latin-1") from None
    if b"\r" in raw_value or b"\n" in raw_value or b"\0" in raw_value:
        raise ValueError(f"header value of {name!r} contains CR, LF or NUL")


def checked_headers(headers: object) -> tuple[list[tuple[str, str]], int | None]:
    """The app's headers, checked: a copy the server may extend, and the Content-Length
    they declare (None if none). TypeError/ValueError on anything PEP 3333 forbids."""
    if type(headers) is not list:
        raise TypeError(f"headers must be a list, got {type(headers).__name__}")
    names = _good_names
    length_text: str | None = None
    conflict = False
    for item in headers:
        if type(item) is not tuple or len(item) != 2:
            raise TypeError(f"each header must be a (name, value) tuple, got {item!r}")
        name, value = item
        if type(name) is not str or type(value) is not str:
            raise TypeError(f"header names and values must be str, got {item!r}")
        is_length = names.get(name)
        if is_length is None:
            is_length = _check_name(name)
        # printable ASCII has no CR, LF or NUL and is latin-1 (a tab is not printable)
        if not (value.isascii() and value.isprintable()):
            _check_value(name, value)
        if is_length:
            value = value.strip()
            if length_text is None:
                length_text = value
            elif value != length_text:
                conflict = True
    if length_text is None:
        return list(headers), None
    if conflict:
        values = sorted({v.strip() for n, v in headers if n.lower() == "content-length"})
        raise ValueError(f"conflicting Content-Length headers: {values}")
    if not (length_text.isascii() and length_text.isdigit()):
        raise ValueError(f"Content-Length must be a non-negative integer, got {length_text!r}")
    return list(headers), int(length_text)


def check_headers(headers: object) -> list[tuple[str, str]]:
    """The app's headers, checked; returns a copy the server may extend."""
    return checked_headers(headers)[0]


def declared_length(headers: list[tuple[str, str]]) -> int | None:
    """The Content-Length the headers declare, None if none; ValueError if malformed."""
    values = {v.strip() for n, v in headers if n.lower() == "content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"conflicting Content-Length headers: {sorted(values)}")
    value = values.pop()
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"Content-Length must be a non-negative integer, got {value!r}")
    return int(value)


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
        self.length: int | None = None  # the app's own Content-Length
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
        self.headers, self.length = checked_headers(headers)
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
            self._complete()
        except ClientGone as exc:
            self.client_gone = True
            if not exc.logged:
                log.info(
                    "client went away (%s %s): %s",
                    self.environ.get("REQUEST_METHOD"),
                    self.environ.get("PATH_INFO"),
                    exc.__cause__ or exc,
                )
        except Exception:
            self.failed = True
            self._handle_error(sys.exc_info())
        finally:
            if result is not None:
                self._close(result)

    def _iterate(self, result: Iterable[bytes]) -> None:
        if isinstance(result, FileWrapper) and self._try_sendfile(result):
            return
        if (
            isinstance(result, (list, tuple))
            and not self.headers_sent
            and self.status is not None
            and self.length is None
        ):
            for chunk in result:
                self._check_chunk(chunk)
            body = b"".join(result)
            self.headers.append(("Content-Length", str(len(body))))
            self.length = len(body)
            self._send_headers(body, final=True)
            return
        for chunk in result:
            self._check_chunk(chunk)
            if chunk:
                self._send(chunk)
            if self.length is not None and self.body_bytes >= self.length:
                break  # PEP 3333: stop iterating once Content-Length is reached

    def _complete(self) -> None:
        if not self.headers_sent:
            self._send_headers(b"", final=True)
        if self._short():
            log.error(
                "app declared Content-Length %s but sent %d bytes (%s %s): connection cut",
                self.length,
                self.body_bytes,
                self.environ.get("REQUEST_METHOD"),
                self.environ.get("PATH_INFO"),
            )
            self._sink_call(self.sink.abort)
        else:
            try:
                self.sink.finish()
            except OSError as exc:
                raise ClientGone(str(exc)) from exc

    def _short(self) -> bool:
        """True when the body is shorter than the app's Content-Length said it would be."""
        if self.length is None or self.body_bytes >= self.length:
            return False
        bodyless = self.status_code < 200 or self.status_code in (204, 304)
        return not bodyless and self.environ.get("REQUEST_METHOD") != "HEAD"

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
        count = None if self.length is None else self.length - self.body_bytes
        if count is not None and count <= 0:
            return True
        sent = self._sink_call(self.sink.send_file, file, count)
        if sent is None:
            return False
        self.body_bytes += sent
        return True

    def _send(self, data: bytes) -> None:
        if self.status is None:
            raise AssertionError("the app sent body bytes before calling start_response")
        if self.length is not None:
            room = self.length - self.body_bytes
            if len(data) > room:
                log.warning(
                    "app sent more than its Content-Length %d (%s %s): extra bytes dropped",
                    self.length,
                    self.environ.get("REQUEST_METHOD"),
                    self.environ.get("PATH_INFO"),
                )
                data = data[:room]
                if not data:
                    return
        if not self.headers_sent:
            self._send_headers(data, final=False)
        else:
            self._sink_call(self.sink.send_body, data)
        self.body_bytes += len(data)

    def _send_headers(self, body: bytes, final: bool) -> None:
        if self.status is None:
            raise AssertionError("the app returned without calling start_response")
        if final and self.length is None:
            self.headers.append(("Content-Length", str(len(body))))
            self.length = len(body)
        self.headers_sent = True
        try:
            self.sink.send_headers(self.status, self.headers, body)
        except OSError as exc:
            raise ClientGone(str(exc)) from exc
        if final:
            self.body_bytes += len(body)

    @staticmethod
    def _sink_call(method: Callable[..., Any], *args: Any) -> Any:
        """Call the sink; an ``OSError`` there means the client went away."""
        try:
            return method(*args)
        except OSError as exc:
            raise ClientGone(str(exc)) from exc

    def _handle_error(self, exc_info: Any) -> None:
        where = (self.environ.get("REQUEST_METHOD"), self.environ.get("PATH_INFO"))
        if self.headers_sent:
            log.error(
                "app failed after the response started (%s %s): connection cut",
                *where,
                exc_info=exc_info,
            )
            try:
                self.sink.abort()
            except OSError:
                pass
            return
        log.error("app failed (%s %s): answered 500", *where, exc_info=exc_info)
        self.status, self.status_code = "500 Internal Server Error", 500
        self.headers = [("Content-Type", "text/plain; charset=utf-8")]
        self.length = None
        self.body_bytes = 0
        try:
            self._send_headers(ERROR_BODY, final=True)
            self._sink_call(self.sink.finish)
        except ClientGone:
            self.client_gone = True

    def _close(self, result: Iterable[bytes]) -> None:
        close = getattr(result, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:
            log.exception("the app iterable's close() raised")
