"""GZip and Buffer middleware: in-process under wsgiref.validate on both sides, then through
real chaussette processes (``--middleware``) on an HTTP backend and on FastCGI.

The two ``Tag*`` factories below are also used by dotted path from a child process, to
show the order of ``--middleware`` layers.
"""

from __future__ import annotations

import gzip as gziplib
import io
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.util import FileWrapper, setup_testing_defaults
from wsgiref.validate import validator

import pytest

from chaussette.middleware import wrap
from chaussette.middleware.buffer import BufferMiddleware
from chaussette.middleware.gzip import GZipMiddleware, accepts_gzip, add_vary, compressible
from tests.conftest import (
    ROUTES_APP,
    Conn,
    dechunk,
    error_line,
    free_port,
    http_request,
    request_bytes,
    require_module,
    run_chaussette,
    wait_http,
)
from tests.fcgi_client import FCGIClient, params_for

LOCAL = "127.0.0.1"
TEXT = b"The quick brown fox jumps over the lazy dog. " * 40  # 1800 bytes, compresses well


# -- a WSGI test harness --


class Closing:
    """An app iterable that records whether close() was called."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = list(chunks)
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed = True


def make_app(
    chunks: Iterable[bytes],
    headers: list[tuple[str, str]] | None = None,
    status: str = "200 OK",
    ctype: str | None = "text/plain",
) -> tuple[Callable[..., Any], Closing]:
    body = Closing(chunks)
    hdrs = list(headers or [])
    if ctype is not None:
        hdrs.insert(0, ("Content-Type", ctype))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Closing:
        start_response(status, list(hdrs))
        return body

    return app, body


class Called:
    def __init__(self, status: str, headers: list[tuple[str, str]], chunks: list[bytes]) -> None:
        self.status, self.headers, self.chunks = status, headers, chunks

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, self.headers
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def text(self) -> bytes:
        """The body, gunzipped when it says it is gzip."""
        if self.header("Content-Encoding") == "gzip":
            return gziplib.decompress(self.body)
        return self.body


def base_environ(**extra: Any) -> dict[str, Any]:
    environ: dict[str, Any] = {"SCRIPT_NAME": "", "PATH_INFO": "/", "QUERY_STRING": ""}
    environ.update(extra)
    setup_testing_defaults(environ)
    return environ


def call(
    app: Callable[..., Any],
    method: str = "GET",
    accept: str | None = "gzip",
    stop_after: int | None = None,
    **environ_extra: Any,
) -> Called:
    """Call ``app`` as a server would, with wsgiref.validate on the server side; write()
    data is recorded as chunks in order with the iterable's."""
    environ = base_environ(REQUEST_METHOD=method)
    if accept is not None:
        environ["HTTP_ACCEPT_ENCODING"] = accept
    environ.update(environ_extra)
    seen: dict[str, Any] = {}
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info is not None and seen.get("sent"):
            raise exc_info[1].with_traceback(exc_info[2])
        seen["status"], seen["headers"] = status, headers
        return chunks.append

    result = validator(app)(environ, start_response)
    try:
        for i, chunk in enumerate(result):
            if chunk:
                seen["sent"] = True
            chunks.append(chunk)
            if stop_after is not None and i + 1 >= stop_after:
                break
    finally:
        result.close()  # type: ignore[attr-defined]
    return Called(seen["status"], seen["headers"], chunks)


def gz(app: Callable[..., Any], **kw: Any) -> Callable[..., Any]:
    """GZip around the app, with the validator on the app's side too."""
    return GZipMiddleware(validator(app), **kw)


# -- GZip: negotiation --


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gzip", True),
        ("GZip", True),
        ("x-gzip", True),
        ("deflate, gzip", True),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        ("*", True),
        ("gzip;q=0.5, identity;q=0.2", True),
        ("identity;q=0, gzip", True),
        ("gzip ; q=0.001", True),
        (None, False),
        ("", False),
        ("identity", False),
        ("deflate, br", False),
        ("gzip;q=0", False),
        ("gzip;q=0.0", False),
        ("*;q=0", False),
        ("gzip;q=0, *", False),
        ("identity;q=1, gzip;q=0.5", False),
        ("gzip;q=abc", False),
        ("gzip;q=1.5", False),
        ("gzip;q=-1", False),
    ],
)
def test_accept_encoding(value: str | None, expected: bool) -> None:
    assert accepts_gzip(value) is expected
    app, body = make_app([TEXT])
    resp = call(gz(app), accept=value)
    assert (resp.header("Content-Encoding") == "gzip") is expected
    assert resp.header("Vary") == "Accept-Encoding"
    assert resp.text() == TEXT
    assert body.closed


@pytest.mark.parametrize(
    ("ctype", "expected"),
    [
        ("text/html; charset=utf-8", True),
        ("TEXT/CSS", True),
        ("application/json", True),
        ("application/problem+json", True),
        ("application/atom+xml", True),
        ("image/svg+xml", True),
        ("image/png", False),
        ("application/octet-stream", False),
        ("application/zip", False),
        ("video/mp4", False),
        ("", False),
        (None, False),
    ],
)
def test_compressible_types(ctype: str | None, expected: bool) -> None:
    assert compressible(ctype) is expected


# -- GZip: what it compresses and how --


def test_compresses_and_fixes_headers() -> None:
    app, body = make_app([TEXT], [("Content-Length", str(len(TEXT))), ("ETag", '"abc"')])
    resp = call(gz(app))
    assert resp.status == "200 OK"
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.header("Content-Length") is None
    assert resp.header("Vary") == "Accept-Encoding"
    assert resp.header("ETag") == 'W/"abc"'
    assert len(resp.body) < len(TEXT) // 4
    assert resp.text() == TEXT
    assert body.closed


def test_level_and_types_are_options() -> None:
    app, _ = make_app([TEXT], ctype="application/x-custom")
    assert call(gz(app)).header("Content-Encoding") is None
    app, _ = make_app([TEXT], ctype="application/x-custom")
    resp = call(gz(app, types=["application/x-custom"], level=1))
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.text() == TEXT
    with pytest.raises(ValueError, match="level"):
        GZipMiddleware(app, level=10)


def test_vary_merged() -> None:
    assert add_vary([("Vary", "Cookie")]) == [("Vary", "Cookie, Accept-Encoding")]
    assert add_vary([("vary", "accept-encoding")]) == [("vary", "accept-encoding")]
    assert add_vary([("Vary", "*")]) == [("Vary", "*")]
    app, _ = make_app([TEXT], [("Vary", "Cookie")])
    resp = call(gz(app))
    assert resp.header("Vary") == "Cookie, Accept-Encoding"


@pytest.mark.parametrize(
    ("headers", "status", "ctype", "method"),
    [
        ([("Content-Encoding", "br")], "200 OK", "text/plain", "GET"),  # already encoded
        ([("Content-Length", "10")], "200 OK", "text/plain", "GET"),  # tiny
        ([], "200 OK", "image/png", "GET"),  # not compressible
        ([("Cache-Control", "public, no-transform")], "200 OK", "text/plain", "GET"),
        ([("Content-Range", "bytes 0-9/100")], "206 Partial Content", "text/plain", "GET"),
    ],
)
def test_left_alone(
    headers: list[tuple[str, str]], status: str, ctype: str | None, method: str
) -> None:
    chunks = [b"0123456789"] if ("Content-Length", "10") in headers else [TEXT[:10]]
    if status.startswith("206"):
        chunks = [b"0123456789"]
        headers = [*headers, ("Content-Length", "10")]
    app, body = make_app(chunks, headers, status=status, ctype=ctype)
    middleware = GZipMiddleware(app)
    environ = base_environ(REQUEST_METHOD=method, HTTP_ACCEPT_ENCODING="gzip")
    # the very iterable of the app comes back: nothing added, nothing copied
    assert middleware(environ, lambda s, h, e=None: None) is body
    resp = call(gz(app))
    assert resp.header("Content-Encoding") == dict(headers).get("Content-Encoding")
    assert resp.header("Vary") is None
    assert resp.body == b"".join(chunks)
    assert body.closed


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_no_body_statuses(status: str) -> None:
    app, body = make_app([], status=status, ctype=None)
    resp = call(gz(app))
    assert resp.status == status
    assert resp.header("Content-Encoding") is None
    assert resp.body == b""
    assert body.closed


def test_head_not_compressed_but_varies() -> None:
    app, body = make_app([], [("Content-Length", str(len(TEXT)))])
    resp = call(gz(app), method="HEAD")
    assert resp.header("Content-Encoding") is None
    assert resp.header("Content-Length") == str(len(TEXT))
    assert resp.header("Vary") == "Accept-Encoding"
    assert body.closed


def test_streams_chunk_by_chunk() -> None:
    """Each chunk the app yields comes out as one chunk that decompresses, alone, to exactly
    that chunk: nothing waits in the compressor. A generator app calls start_response late."""
    pieces = [f"line {i}: ".encode() + TEXT[: 50 + i] for i in range(20)] + [b"", b"end"]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        yield from pieces

    resp = call(gz(app))
    assert resp.header("Content-Encoding") == "gzip"
    assert len(resp.chunks) == len(pieces) + 1  # one per input, then the gzip trailer
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for piece, chunk in zip(pieces, resp.chunks, strict=False):
        assert decoder.decompress(chunk) == piece
    assert decoder.decompress(resp.chunks[-1]) == b""
    assert decoder.eof
    assert resp.text() == b"".join(pieces)


def test_write_callable_and_iterable_in_order() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written first; ")
        write(TEXT)
        return [b"; then returned"]

    resp = call(gz(app))
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.text() == b"written first; " + TEXT + b"; then returned"


def test_bounded_memory_on_a_long_stream() -> None:
    """16 MiB streamed in 64 KiB chunks: every output chunk is about the size of its input
    (nothing accumulates), and the whole comes back intact."""
    rand = os.urandom(65536)
    count = 256

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for _ in range(count):
            yield rand

    middleware = GZipMiddleware(app)
    environ = base_environ(HTTP_ACCEPT_ENCODING="gzip")
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    result = middleware(environ, lambda s, h, e=None: None)
    try:
        for chunk in result:
            assert len(chunk) < len(rand) + 1024
            total += len(decoder.decompress(chunk))
    finally:
        result.close()  # type: ignore[attr-defined]
    assert total == count * len(rand)


def test_closes_when_the_server_stops_early() -> None:
    app, body = make_app([TEXT] * 5)
    resp = call(gz(app), stop_after=2)
    assert len(resp.chunks) == 2
    assert body.closed


def test_error_page_with_exc_info_goes_out_plain() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/html")])
        try:
            raise ValueError("oops")
        except ValueError:
            import sys

            start_response("500 Oops", [("Content-Type", "text/html")], sys.exc_info())
        yield b"<h1>error</h1>"

    resp = call(GZipMiddleware(app))  # wsgiref.validate forbids the exc_info dance inside
    assert resp.status == "500 Oops"
    assert resp.header("Content-Encoding") is None
    assert resp.header("Vary") == "Accept-Encoding"
    assert resp.body == b"<h1>error</h1>"


def test_file_wrapper_kept_when_left_alone() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Type", "image/png"), ("Content-Length", "4")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"\x89PNG"))

    environ = base_environ(HTTP_ACCEPT_ENCODING="gzip", **{"wsgi.file_wrapper": FileWrapper})
    result = GZipMiddleware(app)(environ, lambda s, h, e=None: None)
    assert isinstance(result, FileWrapper)
    result.close()


# -- Buffer --


def buffered(app: Callable[..., Any], size: int) -> Callable[..., Any]:
    return BufferMiddleware(validator(app), size=size)


def test_buffer_coalesces_small_chunks() -> None:
    pieces = [b"%03d," % i for i in range(100)]  # 4 bytes each
    app, body = make_app(pieces)
    resp = call(buffered(app, 64))
    assert resp.body == b"".join(pieces)
    sent = [c for c in resp.chunks if c]
    assert [len(c) for c in sent] == [64] * 6 + [16]
    # one value out for each value in (empty while accumulating), then the rest
    assert len(resp.chunks) == len(pieces) + 1
    assert body.closed


def test_buffer_passes_big_chunks_without_copy() -> None:
    big = b"B" * 1000
    app, _ = make_app([big, b"a", b"b", big, b"c"])
    resp = call(BufferMiddleware(app, size=100))
    sent = [c for c in resp.chunks if c]
    assert sent[0] is big
    assert sent[1] == b"ab" + big
    assert sent[2] == b"c"


def test_buffer_empty_chunk_flushes() -> None:
    app, _ = make_app([b"event 1\n", b"", b"event 2\n", b"more\n", b""])
    resp = call(buffered(app, 1024))
    assert [c for c in resp.chunks if c] == [b"event 1\n", b"event 2\nmore\n"]


def test_buffer_keeps_write_order() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        for i in range(10):
            write(b"w%d " % i)
        return [b"i%d " % i for i in range(10)]

    resp = call(buffered(app, 16))
    assert resp.body == b"".join(b"w%d " % i for i in range(10)) + b"".join(
        b"i%d " % i for i in range(10)
    )
    assert all(len(c) >= 16 for c in resp.chunks[:-1] if c)


def test_buffer_closes_when_the_server_stops_early() -> None:
    app, body = make_app([b"x"] * 10)
    call(buffered(app, 4), stop_after=3)
    assert body.closed


def test_buffer_file_wrapper_untouched() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"abc"))

    environ = base_environ(**{"wsgi.file_wrapper": FileWrapper})
    result = BufferMiddleware(app)(environ, lambda s, h, e=None: None)
    assert isinstance(result, FileWrapper)
    result.close()
    with pytest.raises(ValueError, match="size"):
        BufferMiddleware(app, size=0)


def test_gzip_over_buffer_compresses_the_coalesced_chunks() -> None:
    pieces = [b"tiny piece %d\n" % i for i in range(50)]
    app, body = make_app(pieces)
    stacked = wrap(validator(app), ["gzip", "buffer"])  # gzip outermost
    resp = call(stacked)
    assert resp.text() == b"".join(pieces)
    assert sum(1 for c in resp.chunks if c) < 10  # not one deflate block per tiny piece
    assert body.closed


# -- layering by name, used by dotted path from a child process too --


def _tagger(tag: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def factory(app: Callable[..., Any]) -> Callable[..., Any]:
        def tagged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            def sr(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                headers = [*headers, ("X-Layers", tag)]
                return (
                    start_response(status, headers, exc_info)
                    if exc_info
                    else start_response(status, headers)
                )

            return app(environ, sr)

        return tagged

    return factory


TagOuter = _tagger("outer")
TagInner = _tagger("inner")


def test_wrap_order_first_is_outermost() -> None:
    app, _ = make_app([b"x"])
    resp = call(wrap(app, ["tests.test_middleware:TagOuter", "tests.test_middleware.TagInner"]))
    assert [v for k, v in resp.headers if k == "X-Layers"] == ["inner", "outer"]


# -- through real chaussette processes --


@pytest.fixture
def http_server(procs):
    def start(*middleware: str) -> tuple[str, int]:
        port = free_port()
        args = [f"--middleware={name}" for name in middleware]
        proc = procs.chaussette("--port", str(port), *args, ROUTES_APP)
        wait_http((LOCAL, port), proc)
        return (LOCAL, port)

    return start


def test_http_backend_gzip(http_server) -> None:
    address = http_server("gzip")
    resp = http_request(address, "/big?size=100000", headers={"Accept-Encoding": "gzip"})
    assert resp.status == 200
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.header("Vary") == "Accept-Encoding"
    assert len(resp.body) < 2000
    assert gziplib.decompress(resp.body) == b"b" * 100000
    plain = http_request(address, "/big?size=100000")
    assert plain.header("Content-Encoding") is None
    assert plain.header("Vary") == "Accept-Encoding"
    assert plain.body == b"b" * 100000
    tiny = http_request(address, "/", headers={"Accept-Encoding": "gzip"})
    assert (tiny.header("Content-Encoding"), tiny.body) == (None, b"hello")


def test_http_backend_gzip_streams(http_server) -> None:
    """The first chunk on the wire decompresses to the app's first piece alone."""
    address = http_server("gzip")
    with Conn(address) as conn:
        conn.send(request_bytes("GET", "/stream?n=3&pause=0.3", "Accept-Encoding: gzip"))
        head = conn.read_until(b"\r\n\r\n").decode("latin-1").lower()
        assert "content-encoding: gzip" in head and "transfer-encoding: chunked" in head
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        got = []
        for _ in range(10):
            size = int(conn.read_until(b"\r\n").strip(), 16)
            data = conn.read_exact(size + 2)[:-2]
            if size == 0:
                break
            got.append(decoder.decompress(data))
        assert got[:3] == [b"chunk 0\n", b"chunk 1\n", b"chunk 2\n"]
        assert decoder.eof


def test_http_backend_layers_in_order(http_server) -> None:
    address = http_server("tests.test_middleware:TagOuter,buffer", "tests.test_middleware:TagInner")
    resp = http_request(address, "/")
    assert resp.body == b"hello"
    assert [v for k, v in resp.headers if k.lower() == "x-layers"] == ["inner", "outer"]


def test_fastcgi_gzip(procs) -> None:
    port = free_port()
    proc = procs.chaussette(
        "--protocol", "fastcgi", "--backend", "threads", "--port", str(port),
        "--middleware", "gzip", ROUTES_APP,
    )  # fmt: skip
    address = (LOCAL, port)
    for _ in range(200):
        try:
            with FCGIClient(address) as client:
                client.request("/")
            break
        except OSError:
            assert proc.popen.poll() is None, proc.output()
            time.sleep(0.05)
    with FCGIClient(address) as client:
        big = client.request("/big?size=50000", HTTP_ACCEPT_ENCODING="gzip;q=1")
        status, headers, body = big.cgi()
        assert (status, headers.get("content-encoding")) == (200, "gzip")
        assert gziplib.decompress(body) == b"b" * 50000
        client.begin(2, params_for("/stream?n=3&pause=0.2", HTTP_ACCEPT_ENCODING="gzip"))
        streamed = client.result(2)
        status, headers, body = streamed.cgi()
        assert (status, headers.get("content-encoding")) == (200, "gzip")
        assert gziplib.decompress(body) == b"chunk 0\nchunk 1\nchunk 2\n"
        # piece by piece: no STDOUT record carries more than one of the app's pieces
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pieces = list(streamed.pieces)
        pieces[0] = pieces[0].partition(b"\r\n\r\n")[2]
        out = [decoder.decompress(p) for p in pieces]
        assert [o for o in out if o] == [b"chunk 0\n", b"chunk 1\n", b"chunk 2\n"]
        plain = client.request("/big?size=50000", request_id=3, HTTP_ACCEPT_ENCODING="gzip;q=0")
        status, headers, body = plain.cgi()
        assert headers.get("content-encoding") is None and body == b"b" * 50000


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("zip", "--middleware zip: unknown middleware (short names: buffer, gzip;"),
        ("nosuch.module:mw", "--middleware nosuch.module:mw: no module named 'nosuch'"),
        ("tests.test_middleware:Nope", "has no attribute 'Nope'"),
        ("tests.test_middleware:TEXT", "not a callable"),
        ("gzip:level=9", "the short name 'gzip' takes no options"),
    ],
)
def test_bad_name_is_a_usage_error(name: str, expected: str) -> None:
    code, output = run_chaussette("--port", str(free_port()), "--middleware", name, ROUTES_APP)
    assert code == 2, output
    assert expected in error_line(output)
    assert "Traceback" not in output


def test_unknown_short_name_is_refused_before_the_app_is_imported(tmp_path) -> None:
    marker = tmp_path / "imported"
    app = tmp_path / "touchy.py"
    app.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [])\n"
        "    return [b'']\n"
    )
    code, output = run_chaussette(
        "--port", str(free_port()), "--middleware", "zip", "--python-path", str(tmp_path),
        "touchy:application",
    )  # fmt: skip
    assert code == 2, output
    assert "unknown middleware" in error_line(output)
    assert not marker.exists()  # the app module was never imported


def test_mongrel2_gzip(procs) -> None:
    """The same through chaussette's Mongrel2 handler (a fake Mongrel2 of real sockets)."""
    require_module("zmq", "pip install pyzmq")
    import zmq

    from chaussette.protocols import mongrel2
    from tests.test_devices import SENDER, FakeMongrel2, headers_for

    context = zmq.Context()
    m2 = FakeMongrel2(context)
    try:
        proc = procs.chaussette(
            "--protocol", "mongrel2", "--zeromq", m2.zeromq, "--middleware", "gzip", ROUTES_APP
        )
        m2.wait_for_handler(proc)

        def get(conn: str, path: str) -> list[bytes]:
            m2.send(
                mongrel2.encode_request(
                    SENDER, conn, path.partition("?")[0], headers_for(path, accept_encoding="gzip")
                )
            )
            payloads = []
            for _ in range(100):
                _, ids, payload = m2.reply()
                assert ids == [conn]
                payloads.append(payload)
                if payload.endswith(b"0\r\n\r\n") or b"Content-Length" in payloads[0]:
                    return payloads
            raise AssertionError("response never ended")

        payloads = get("1", "/big?size=30000")
        head, _, body = b"".join(payloads).partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head
        assert gziplib.decompress(dechunk(body)) == b"b" * 30000
        # streamed: a message per piece, each decompressing to one of the app's pieces
        payloads = get("2", "/stream?n=3&pause=0.1")
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        payloads[0] = payloads[0].partition(b"\r\n\r\n")[2]  # the head came with piece 0
        pieces = [decoder.decompress(dechunk(p + b"0\r\n\r\n")) for p in payloads[:-1]]
        assert [p for p in pieces if p] == [b"chunk 0\n", b"chunk 1\n", b"chunk 2\n"]
    finally:
        m2.close()
        context.destroy(linger=0)
