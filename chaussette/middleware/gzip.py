"""GZip: compress responses for clients that accept it, streaming.

Plain WSGI (PEP 3333) middleware with no dependency on the rest of chaussette::

    from chaussette.middleware.gzip import GZipMiddleware
    application = GZipMiddleware(application, min_size=200, level=6)

Rules it keeps:

- A response is *eligible* when its status is not 1xx/204/206/304, it has no
  Content-Encoding and no Content-Range, no ``Cache-Control: no-transform``, a compressible
  Content-Type (``text/*``, JSON, JavaScript, XML, SVG, ...: ``COMPRESSIBLE``; no
  Content-Type means not eligible) and, when it declares a Content-Length, at least
  ``min_size`` bytes. A response of unknown length is eligible whatever its size: waiting
  to learn the size would break streaming.
- Every eligible response gets ``Vary: Accept-Encoding`` (a cache must not hand the gzip
  body to a client that did not ask for it), whether or not this client gets it compressed.
- It is compressed when the request's Accept-Encoding gives ``gzip`` (or ``x-gzip``, or
  ``*`` when gzip is not named) a q-value above 0 that is not below an explicit q-value of
  ``identity``; and never for HEAD (the body is empty, and the headers would then not be
  those of the GET). Then Content-Length goes, ``Content-Encoding: gzip`` comes, and a
  strong ETag becomes weak (the bytes differ from the uncompressed representation's).
- Streaming: each chunk the application yields (or passes to ``write()``) is compressed and
  sync-flushed at once, so a streamed response still arrives piece by piece; one chunk out
  for each chunk in (an empty one when the input was empty, as PEP 3333 asks of middleware).
  Memory is bounded by the compressor's window plus the chunk being compressed.
- The application's iterable is always closed; responses left alone are returned as the
  very iterable the application gave (a ``wsgi.file_wrapper`` keeps its sendfile path).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

StartResponse = Callable[..., Callable[[bytes], Any]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType]

COMPRESSIBLE = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/*+xml",
    "application/xhtml+xml",
    "application/x-www-form-urlencoded",
    "application/wasm",
    "image/svg+xml",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "font/ttf",
    "font/otf",
)
MIN_SIZE = 200  # below this many bytes, gzip's 20-byte frame and the CPU are not worth it

_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around raw deflate


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding value lets us send gzip (RFC 9110, 12.5.3).

    Entries with a malformed q-value are ignored; no header at all means no gzip (a client
    that says nothing may not decode it).
    """
    if not accept_encoding:
        return False
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if not 0.0 <= q <= 1.0:
            continue
        if coding == "x-gzip":
            coding = "gzip"
        weights[coding] = max(q, weights.get(coding, -1.0))
    gzip_q = weights.get("gzip", weights.get("*", 0.0))
    if gzip_q <= 0.0:
        return False
    return gzip_q >= weights.get("identity", 0.0)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def compressible(content_type: str | None, patterns: Iterable[str] = COMPRESSIBLE) -> bool:
    """Whether a Content-Type matches one of ``patterns`` (``text/*``, ``application/*+json``)."""
    if not content_type:
        return False
    media = _media_type(content_type)
    major, _, minor = media.partition("/")
    for pattern in patterns:
        p_major, _, p_minor = pattern.lower().partition("/")
        if p_major != major:
            continue
        if p_minor == "*" or p_minor == minor:
            return True
        if p_minor.startswith("*+") and minor.endswith(p_minor[1:]):
            return True
    return False


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def add_vary(
    headers: list[tuple[str, str]], field: str = "Accept-Encoding"
) -> list[tuple[str, str]]:
    """``headers`` with ``field`` in Vary (merged into an existing Vary; ``*`` left alone)."""
    out: list[tuple[str, str]] = []
    done = False
    for key, value in headers:
        if key.lower() == "vary" and not done:
            names = [v.strip().lower() for v in value.split(",")]
            if field.lower() not in names and "*" not in names:
                value = f"{value}, {field}" if value.strip() else field
            done = True
        out.append((key, value))
    if not done:
        out.append(("Vary", field))
    return out


class GZipMiddleware:
    """Wrap ``app`` so that eligible responses are gzip-compressed for clients that accept it.

    ``level``: zlib level (1 fastest .. 9 smallest). ``min_size``: a response whose
    Content-Length is below it is sent as is. ``types``: the compressible media types
    (``text/*``-style wildcards and ``application/*+json``-style suffixes allowed).
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        level: int = 6,
        min_size: int = MIN_SIZE,
        types: Iterable[str] = COMPRESSIBLE,
    ) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"gzip level {level}: must be 0..9")
        self.app = app
        self.level = level
        self.min_size = min_size
        self.types = tuple(types)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        wanted = environ.get("REQUEST_METHOD") != "HEAD" and accepts_gzip(
            environ.get("HTTP_ACCEPT_ENCODING")
        )
        state = _Response(self, start_response, wanted)
        result = self.app(environ, state.start_response)
        if state.compressor is None and state.started:
            return result  # left alone: the very iterable (file_wrapper keeps sendfile)
        return _GZipIterable(result, state)

    def eligible(self, status: str, headers: list[tuple[str, str]]) -> bool:
        """Whether a response with this status and headers may be compressed."""
        code = status[:3]
        if code.startswith("1") or code in ("204", "206", "304"):
            return False
        if _header(headers, "content-encoding") or _header(headers, "content-range"):
            return False
        if "no-transform" in (_header(headers, "cache-control") or "").lower():
            return False
        if not compressible(_header(headers, "content-type"), self.types):
            return False
        length = _header(headers, "content-length")
        if length is not None:
            try:
                if int(length) < self.min_size:
                    return False
            except ValueError:
                return False  # the server will refuse it anyway; do not make it worse
        return True


class _Response:
    """The state of one response: its start_response, write() and compressor."""

    def __init__(self, owner: GZipMiddleware, start_response: StartResponse, wanted: bool) -> None:
        self.owner = owner
        self.upstream = start_response
        self.wanted = wanted
        self.started = False
        self.compressor: Any = None  # zlib.Compress (not nameable before Python 3.12)
        self.write_upstream: Callable[[bytes], Any] | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], Any]:
        self.compressor = None
        if self.owner.eligible(status, headers):
            headers = add_vary(headers)
            # an error page replacing the headers (exc_info) goes out as the app made it:
            # the body iterable may already have been handed back unwrapped
            if self.wanted and exc_info is None:
                headers = self._compressed_headers(headers)
                self.compressor = zlib.compressobj(self.owner.level, zlib.DEFLATED, _GZIP_WBITS)
        if exc_info is not None:
            self.write_upstream = self.upstream(status, headers, exc_info)
        else:
            self.write_upstream = self.upstream(status, headers)
        self.started = True
        return self.write

    @staticmethod
    def _compressed_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for key, value in headers:
            name = key.lower()
            if name == "content-length":
                continue
            if name == "etag" and not value.lstrip().startswith("W/"):
                value = "W/" + value.strip()
            out.append((key, value))
        out.append(("Content-Encoding", "gzip"))
        return out

    def compress(self, data: bytes) -> bytes:
        if self.compressor is None or not data:
            return data
        out: bytes = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        return out

    def write(self, data: bytes) -> None:
        if self.write_upstream is None:
            raise AssertionError("write() before start_response()")
        if data:
            self.write_upstream(self.compress(data))

    def finish(self) -> bytes:
        if self.compressor is None:
            return b""
        tail: bytes = self.compressor.flush(zlib.Z_FINISH)
        self.compressor = None
        return tail


class _GZipIterable:
    """The compressed body: one output chunk per input chunk, then the gzip trailer."""

    def __init__(self, result: Iterable[bytes], state: _Response) -> None:
        self.result = result
        self.state = state

    def __iter__(self) -> Iterator[bytes]:
        state = self.state
        for chunk in self.result:
            # start_response may be called on the first next() (a generator app)
            yield state.compress(chunk) if state.compressor is not None else chunk
        tail = state.finish()
        if tail:
            yield tail

    def close(self) -> None:
        close = getattr(self.result, "close", None)
        if close is not None:
            close()
