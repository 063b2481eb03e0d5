"""The Mongrel2 message core: message tables, golden captures of Mongrel2 1.12.2, the environ
rule, replies and response heads, fuzzing.

Expected bytes and values are written by hand from the formats (and, for the captures, from
the requests that were made: tests/data/README.txt), not produced by the code under test.
ZeroMQ delivers whole messages, so "fed a byte at a time" here means: every proper prefix of
a valid message is rejected (never taken for a shorter message), and so is trailing data.
"""

from __future__ import annotations

import re
import wsgiref.validate
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaussette.protocols import mongrel2 as m
from chaussette.protocols.errors import RemoteProtocolError

DATA = Path(__file__).resolve().parent / "data"
UPLOAD_PATH = re.compile(r"tmp/upload\.[A-Za-z0-9]{6}\Z")
BIG_BODY_LENGTH = "4096"  # b"0123456789abcdef" * 256, over limits.content_length = 1024


def golden(name: str) -> bytes:
    return (DATA / f"mongrel2_{name}.bin").read_bytes()


def ns(data: bytes, tag: bytes = b",") -> bytes:
    """A netstring / tnetstring around ``data`` (for building malformed messages)."""
    return b"%d:%s%s" % (len(data), data, tag)


# --------------------------------------------------------------------------- message table

DISCONNECT_BODY = b'{"type":"disconnect"}'

# (id, sender, conn_id, path, headers, body, json, the message on the wire)
MESSAGES: list[tuple[str, str, str, str, dict[str, Any], bytes, bool, bytes]] = [
    (
        "tnet-repeated-header",
        "u1",
        "7",
        "/a",
        {"METHOD": "GET", "x-a": ["1", "2"]},
        b"",
        False,
        b"u1 7 /a 32:6:METHOD,3:GET,3:x-a,8:1:1,1:2,]}0:,",
    ),
    (
        "json-repeated-header",
        "u1",
        "7",
        "/a",
        {"METHOD": "GET", "x-a": ["1", "2"]},
        b"",
        True,
        b'u1 7 /a 32:{"METHOD":"GET","x-a":["1","2"]},0:,',
    ),
    (
        "tnet-latin1-and-body",
        "s",
        "12345",
        "/p",
        {"x-l": "caf\u00e9"},
        b"a b",
        False,
        b"s 12345 /p 13:3:x-l,4:caf\xe9,}3:a b,",
    ),
    (
        "json-latin1-and-body",
        "s",
        "12345",
        "/p",
        {"x-l": "caf\u00e9"},
        b"a b",
        True,
        b's 12345 /p 14:{"x-l":"caf\xe9"},3:a b,',
    ),
    (
        "tnet-disconnect",
        "aaaa-tnet",
        "4",
        "@*",
        {"METHOD": "JSON"},
        DISCONNECT_BODY,
        False,
        b'aaaa-tnet 4 @* 16:6:METHOD,4:JSON,}21:{"type":"disconnect"},',
    ),
    (
        "json-disconnect",
        "aaaa-json",
        "12",
        "@*",
        {"METHOD": "JSON"},
        DISCONNECT_BODY,
        True,
        b'aaaa-json 12 @* 17:{"METHOD":"JSON"},21:{"type":"disconnect"},',
    ),
    ("tnet-empty", "u", "0", "/", {}, b"", False, b"u 0 / 0:}0:,"),
    ("json-empty", "u", "0", "/", {}, b"", True, b"u 0 / 2:{},0:,"),
    (
        "binary-body",
        "u",
        "99999999999999999999",
        "/x",
        {},
        b"\x00,}:\xff",
        False,
        b"u 99999999999999999999 /x 0:}5:\x00,}:\xff,",
    ),
]
MESSAGE_IDS = [c[0] for c in MESSAGES]


@pytest.mark.parametrize(
    ("sender", "conn_id", "path", "headers", "body", "json", "wire"),
    [c[1:] for c in MESSAGES],
    ids=MESSAGE_IDS,
)
def test_encode_request(
    sender: str,
    conn_id: str,
    path: str,
    headers: dict[str, Any],
    body: bytes,
    json: bool,
    wire: bytes,
) -> None:
    assert m.encode_request(sender, conn_id, path, headers, body, json=json) == wire


@pytest.mark.parametrize(
    ("sender", "conn_id", "path", "headers", "body", "json", "wire"),
    [c[1:] for c in MESSAGES],
    ids=MESSAGE_IDS,
)
def test_parse_request(
    sender: str,
    conn_id: str,
    path: str,
    headers: dict[str, Any],
    body: bytes,
    json: bool,
    wire: bytes,
) -> None:
    request = m.parse_request(wire)
    assert request == m.Request(sender, conn_id, path, headers, body)
    assert m.parse_request(bytearray(wire)) == request
    assert m.parse_request(memoryview(wire)) == request
    assert request.is_disconnect is (body == DISCONNECT_BODY)


@pytest.mark.parametrize("wire", [c[-1] for c in MESSAGES], ids=MESSAGE_IDS)
def test_prefixes_and_trailing_data_rejected(wire: bytes) -> None:
    for end in range(len(wire)):
        with pytest.raises(RemoteProtocolError):
            m.parse_request(wire[:end])
    for tail in (b" ", b"x", b"0:,", b"\x00"):
        with pytest.raises(RemoteProtocolError, match=r"after the body|bad"):
            m.parse_request(wire + tail)


def test_json_headers_escaped_text() -> None:
    """Mongrel2 puts the client's raw bytes inside the JSON strings (seen in the captures);
    JSON escapes mean the same text."""
    request = m.parse_request(b'u 1 /p 19:{"x-l":"caf\\u00e9"},0:,')
    assert request.headers == {"x-l": "caf\u00e9"}
    request = m.parse_request(b'u 1 /p 21:{"x-l":"a\\"\\\\\\u0001"},0:,')
    assert request.headers == {"x-l": 'a"\\\x01'}


# (id, message) -> RemoteProtocolError
MALFORMED = [
    ("empty", b""),
    ("three-parts", b"u 1 /p"),
    ("nothing-after-path", b"u 1 /p "),
    ("empty-sender", b" 1 /p 0:}0:,"),
    ("long-sender", b"u" * 300 + b" 1 /p 0:}0:,"),
    ("letter-conn-id", b"u x /p 0:}0:,"),
    ("negative-conn-id", b"u -1 /p 0:}0:,"),
    ("empty-conn-id", b"u  /p 0:}0:,"),
    ("long-conn-id", b"u 123456789012345678901 /p 0:}0:,"),
    ("empty-path", b"u 1  0:}0:,"),
    ("no-body", b"u 1 /p 0:}"),
    ("body-cut", b"u 1 /p 0:}5:ab"),
    ("trailing", b"u 1 /p 0:}0:,x"),
    ("body-is-list", b"u 1 /p 0:}0:]"),
    ("body-is-int", b"u 1 /p 0:}1:1#"),
    ("headers-int", b"u 1 /p 1:1#0:,"),
    ("headers-list", b"u 1 /p 0:]0:,"),
    ("headers-null", b"u 1 /p 0:~0:,"),
    ("header-value-int", b"u 1 /p " + ns(b"1:a,1:1#", b"}") + b"0:,"),
    ("header-value-empty-list", b"u 1 /p " + ns(b"1:a,0:]", b"}") + b"0:,"),
    ("header-value-list-of-int", b"u 1 /p " + ns(b"1:a," + ns(b"1:1#", b"]"), b"}") + b"0:,"),
    ("header-value-nested-list", b"u 1 /p " + ns(b"1:a," + ns(b"0:]", b"]"), b"}") + b"0:,"),
    ("header-value-dict", b"u 1 /p " + ns(b"1:a,0:}", b"}") + b"0:,"),
    ("header-key-not-utf8", b"u 1 /p " + ns(b"1:\xff,1:a,", b"}") + b"0:,"),
    ("header-key-repeated", b"u 1 /p " + ns(b"1:a,1:b,1:a,1:c,", b"}") + b"0:,"),
    ("headers-broken-tnetstring", b"u 1 /p 5:1:a,}0:,"),
    ("json-invalid", b"u 1 /p " + ns(b"{x}") + b"0:,"),
    ("json-array", b"u 1 /p " + ns(b"[]") + b"0:,"),
    ("json-string", b"u 1 /p " + ns(b'"a"') + b"0:,"),
    ("json-value-int", b"u 1 /p " + ns(b'{"a":1}') + b"0:,"),
    ("json-value-null", b"u 1 /p " + ns(b'{"a":null}') + b"0:,"),
    ("json-value-empty-list", b"u 1 /p " + ns(b'{"a":[]}') + b"0:,"),
    ("json-value-list-of-int", b"u 1 /p " + ns(b'{"a":["b",1]}') + b"0:,"),
    ("json-value-object", b"u 1 /p " + ns(b'{"a":{}}') + b"0:,"),
    ("json-deep", b"u 1 /p " + ns(b"[" * 60000) + b"0:,"),
    ("json-deep-valid", b"u 1 /p " + ns(b'{"a":' + b"[" * 30000 + b"]" * 30000 + b"}") + b"0:,"),
]


@pytest.mark.parametrize("wire", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.parse_request(wire)
    assert str(info.value).startswith("Mongrel2 message")


def test_bounds() -> None:
    headers = {"x": "a" * 100}
    wire = m.encode_request("u", "1", "/", headers, b"b" * 50)
    size = len(b"1:x,100:" + b"a" * 100 + b",")  # the headers' declared length: 109
    assert m.parse_request(wire, max_headers_size=size, max_body_size=50).body == b"b" * 50
    with pytest.raises(RemoteProtocolError, match="bound"):
        m.parse_request(wire, max_headers_size=size - 1)
    with pytest.raises(RemoteProtocolError, match="bound"):
        m.parse_request(wire, max_body_size=49)
    json_wire = m.encode_request("u", "1", "/", headers, json=True)
    with pytest.raises(RemoteProtocolError, match="bound"):
        m.parse_request(json_wire, max_headers_size=100)
    # a declared length of 10**12 is refused from its digits
    with pytest.raises(RemoteProtocolError, match="bound"):
        m.parse_request(b"u 1 / 0:}1000000000000:abc,")
    with pytest.raises(RemoteProtocolError, match="bound"):
        m.parse_request(b"u 1 / 1000000000000:}0:,")


# --------------------------------------------------------------------------- golden captures

KINDS = {"tnet": ("aaaa-tnet", "/app", "/app"), "json": ("aaaa-json", "/japp", "/japp/")}
GET_TARGET = "/get/caf%C3%A9%20x"
GET_QUERY = "x=1&name=caf%C3%A9&y=a+b"
CURL_HEADERS = {"user-agent": "curl/7.88.1", "x-forwarded-for": "127.0.0.1"}


def check_common(request: m.Request, kind: str, method: str, target: str, version: str) -> None:
    sender, prefix, pattern = KINDS[kind]
    h = request.headers
    assert request.sender == sender
    assert request.conn_id.isdigit()
    assert request.path == prefix + target
    assert h["PATH"] == prefix + target
    assert h["METHOD"] == method
    assert h["VERSION"] == version
    assert h["PATTERN"] == pattern
    assert h["URL_SCHEME"] == "http"
    assert h["REMOTE_ADDR"] == "127.0.0.1"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", h["host"])  # type: ignore[arg-type]
    for name, value in CURL_HEADERS.items():
        assert h[name] == value
    assert not request.is_disconnect


@pytest.mark.parametrize("kind", list(KINDS))
def test_golden_get(kind: str) -> None:
    """curl -H 'X-Multi: one' -H 'X-Multi: two' -H 'Cookie: a=1' -H 'Cookie: b=2'
    -H $'X-Latin: caf\\xe9' -H 'Accept: text/plain' PREFIX/get/caf%C3%A9%20x?QUERY"""
    request = m.parse_request(golden(f"{kind}_get"))
    _, prefix, _ = KINDS[kind]
    check_common(request, kind, "GET", GET_TARGET, "HTTP/1.1")
    h = request.headers
    assert h["URI"] == f"{prefix}{GET_TARGET}?{GET_QUERY}"
    assert h["QUERY"] == GET_QUERY
    assert h["x-multi"] == ["one", "two"]
    assert h["cookie"] == ["a=1", "b=2"]
    assert h["x-latin"] == "caf\u00e9"  # the raw byte 0xE9, as latin-1
    assert h["accept"] == "text/plain"
    assert request.body == b""
    assert request.upload_start is None and request.upload_done is None
    assert m.upload_stage(request) is None
    assert m.keep_alive(request)
    assert m.url_scheme(request) == "http"
    assert request.header("x-multi") == "one, two"


@pytest.mark.parametrize("kind", list(KINDS))
def test_golden_get_environ(kind: str) -> None:
    request = m.parse_request(golden(f"{kind}_get"))
    _, prefix, _ = KINDS[kind]
    environ = m.environ_from_request(request)
    port = request.headers["host"].split(":")[1]  # type: ignore[union-attr]
    assert environ == {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": prefix,
        "PATH_INFO": "/get/caf\u00c3\u00a9 x",  # latin-1 text of the UTF-8 bytes of "café"
        "QUERY_STRING": GET_QUERY,
        "REQUEST_URI": f"{prefix}{GET_TARGET}?{GET_QUERY}",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": port,
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": f"127.0.0.1:{port}",
        "HTTP_USER_AGENT": "curl/7.88.1",
        "HTTP_ACCEPT": "text/plain",
        "HTTP_X_MULTI": "one, two",
        "HTTP_COOKIE": "a=1; b=2",
        "HTTP_X_LATIN": "caf\u00e9",
        "HTTP_X_FORWARDED_FOR": "127.0.0.1",
    }
    run_validated_app(request)


@pytest.mark.parametrize("kind", list(KINDS))
def test_golden_post(kind: str) -> None:
    """curl -X POST -H 'Content-Type: application/x-www-form-urlencoded'
    --data-binary 'name=chaussette&n=42' PREFIX/post"""
    request = m.parse_request(golden(f"{kind}_post"))
    check_common(request, kind, "POST", "/post", "HTTP/1.1")
    assert request.body == b"name=chaussette&n=42"
    assert "QUERY" not in request.headers
    environ = m.environ_from_request(request)
    assert environ["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert environ["CONTENT_LENGTH"] == "20"
    assert environ["QUERY_STRING"] == ""
    assert environ["PATH_INFO"] == "/post"
    assert "HTTP_CONTENT_TYPE" not in environ and "HTTP_CONTENT_LENGTH" not in environ
    assert run_validated_app(request) == b"name=chaussette&n=42"


@pytest.mark.parametrize("kind", list(KINDS))
def test_golden_upload(kind: str) -> None:
    """curl -X POST -H 'Content-Type: application/octet-stream' --data-binary @big
    PREFIX/upload with a 4096-byte body, limits.content_length = 1024."""
    start = m.parse_request(golden(f"{kind}_upload_start"))
    done = m.parse_request(golden(f"{kind}_upload_done"))
    for request in (start, done):
        check_common(request, kind, "POST", "/upload", "HTTP/1.1")
        assert request.body == b""
        assert request.headers["content-length"] == BIG_BODY_LENGTH
        assert request.headers["content-type"] == "application/octet-stream"
        environ = m.environ_from_request(request)
        assert environ["CONTENT_LENGTH"] == BIG_BODY_LENGTH
        assert not [k for k in environ if "MONGREL2" in k]
    assert start.conn_id == done.conn_id
    path = start.upload_start
    assert path is not None and UPLOAD_PATH.match(path)
    assert start.upload_done is None
    assert m.upload_stage(start) == "start"
    assert done.upload_start == path and done.upload_done == path
    assert m.upload_stage(done) == "done"


@pytest.mark.parametrize("kind", list(KINDS))
def test_golden_disconnect(kind: str) -> None:
    """curl -m 0.5 PREFIX/slow, never answered: the client gives up, Mongrel2 says so."""
    request = m.parse_request(golden(f"{kind}_disconnect"))
    assert request.sender == KINDS[kind][0]
    assert request.path == "@*"
    assert request.headers == {"METHOD": "JSON"}
    assert request.is_disconnect
    assert not m.keep_alive(request)


@pytest.mark.parametrize("kind", list(KINDS))
def test_golden_http10(kind: str) -> None:
    """curl --http1.0 -H 'Connection: keep-alive' PREFIX/old"""
    request = m.parse_request(golden(f"{kind}_http10"))
    check_common(request, kind, "GET", "/old", "HTTP/1.0")
    assert request.headers["connection"] == "keep-alive"
    assert m.keep_alive(request)
    assert m.environ_from_request(request)["SERVER_PROTOCOL"] == "HTTP/1.0"
    head = m.response_head(request, "200 OK", [("Content-Length", "2")], chunked=False, close=False)
    assert head == b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"


@pytest.mark.parametrize("kind", list(KINDS))
def test_golden_forged_upload_headers(kind: str) -> None:
    """The client sends X-Mongrel2-Upload-Start and -Done: /etc/passwd itself, with a
    4-byte body (passed through untouched) and with a 4096-byte one (Mongrel2 replaces the
    start header only)."""
    small = m.parse_request(golden(f"{kind}_forged_small"))
    check_common(small, kind, "POST", "/forged", "HTTP/1.1")
    assert small.upload_start == "/etc/passwd" and small.upload_done == "/etc/passwd"
    assert small.body == b"tiny"
    with pytest.raises(m.UploadError, match="inline body"):
        m.upload_stage(small)
    big = m.parse_request(golden(f"{kind}_forged_big_start"))
    check_common(big, kind, "POST", "/forgedbig", "HTTP/1.1")
    assert big.upload_start is not None and UPLOAD_PATH.match(big.upload_start)
    assert big.upload_done == "/etc/passwd"
    with pytest.raises(m.UploadError, match="another file"):
        m.upload_stage(big)
    for request in (small, big):
        assert not [k for k in m.environ_from_request(request) if "MONGREL2" in k]


def normalized_headers(request: m.Request) -> dict[str, Any]:
    headers: dict[str, Any] = dict(request.headers)
    headers.pop("PATTERN", None)
    for key in ("PATH", "URI"):
        if key in headers:
            headers[key] = re.sub(r"^/j?app/", "/X/", headers[key])
    for key in (m.UPLOAD_START, m.UPLOAD_DONE):
        if key in headers:
            headers[key] = UPLOAD_PATH.sub("UPLOAD", headers[key])
    return headers


GOLDEN_NAMES = [
    "get",
    "post",
    "upload_start",
    "upload_done",
    "disconnect",
    "http10",
    "forged_small",
    "forged_big_start",
]


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_tnetstring_and_json_agree(name: str) -> None:
    """The same request through both handler protocols parses to the same headers."""
    tnet = m.parse_request(golden(f"tnet_{name}"))
    json = m.parse_request(golden(f"json_{name}"))
    assert normalized_headers(tnet) == normalized_headers(json)
    assert tnet.body == json.body
    # and re-encoding reproduces Mongrel2's messages byte for byte
    for request, kind in ((tnet, "tnet"), (json, "json")):
        again = m.encode_request(
            request.sender,
            request.conn_id,
            request.path,
            request.headers,
            request.body,
            json=kind == "json",
        )
        assert again == golden(f"{kind}_{name}")


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_prefixes_rejected(name: str) -> None:
    for kind in KINDS:
        wire = golden(f"{kind}_{name}")
        for end in range(len(wire)):
            with pytest.raises(RemoteProtocolError):
                m.parse_request(wire[:end])


# --------------------------------------------------------------------------- environ rule


def make_request(headers: dict[str, str | list[str]], body: bytes = b"") -> m.Request:
    full: dict[str, str | list[str]] = {"METHOD": "GET", "VERSION": "HTTP/1.1", "PATH": "/"}
    full.update(headers)
    return m.Request("u", "1", str(full["PATH"]), full, body)


# (pattern, raw PATH) -> (SCRIPT_NAME, PATH_INFO)
SPLITS = [
    ("/app", "/app/x", "/app", "/x"),
    ("/app/", "/app/x", "/app", "/x"),
    ("/app", "/app", "/app", ""),
    ("/app/", "/app/", "/app", "/"),
    ("/app", "/app/", "/app", "/"),
    ("/app", "/apple", "", "/apple"),
    ("/app/", "/app//x", "/app", "//x"),
    ("/", "/x/y", "", "/x/y"),
    ("/", "/", "", "/"),
    ("", "/x", "", "/x"),
    ("/a/b/", "/a/b/c", "/a/b", "/c"),
    ("/app/(.*)", "/app/x", "/app", "/x"),
    ("/images/(.*).jpg", "/images/a.jpg", "/images", "/a.jpg"),
    ("(/.*)", "/x", "", "/x"),
    ("/app", "/other", "", "/other"),
    ("/app", "/", "", "/"),
    # percent-decoding: after the split, to latin-1 text of the bytes
    ("/", "/caf%C3%A9", "", "/caf\u00c3\u00a9"),
    ("/", "/a%20b%2Fc", "", "/a b/c"),
    ("/", "/%zz%4", "", "/%zz%4"),
    ("/", "/%00%ff", "", "/\x00\u00ff"),
    ("/app", "/app%2Fx", "", "/app/x"),  # an encoded slash never moves the boundary
    ("/a%20b", "/a%20b/c", "/a b", "/c"),
    ("/app", "/app/caf\u00e9", "/app", "/caf\u00e9"),  # raw non-ASCII byte from the client
]


@pytest.mark.parametrize(("pattern", "path", "script_name", "path_info"), SPLITS)
def test_script_name_and_path_info(
    pattern: str, path: str, script_name: str, path_info: str
) -> None:
    environ = m.environ_from_request(make_request({"PATH": path, "PATTERN": pattern}))
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == (script_name, path_info)
    assert environ["REQUEST_URI"] == path


def test_no_pattern_no_path_header() -> None:
    request = m.Request("u", "1", "/p%20q", {"METHOD": "GET"}, b"")
    environ = m.environ_from_request(request)
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("", "/p q")
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"


# (host header or None, URL_SCHEME) -> (SERVER_NAME, SERVER_PORT)
HOSTS = [
    ("example.com", "http", "example.com", "80"),
    ("example.com", "https", "example.com", "443"),
    ("example.com:8080", "http", "example.com", "8080"),
    ("example.com:", "http", "example.com", "80"),
    ("Example.COM:81", "https", "Example.COM", "81"),
    ("[::1]:8080", "http", "[::1]", "8080"),
    ("[::1]", "https", "[::1]", "443"),
    ("[::1]x", "http", "[::1]", "80"),
    ("host:port", "http", "host:port", "80"),
    (None, "http", "localhost", "80"),
    (None, "https", "localhost", "443"),
    (["a.example:1", "b.example:2"], "http", "a.example", "1"),
]


@pytest.mark.parametrize(("host", "scheme", "name", "port"), HOSTS)
def test_server_name_and_port(
    host: str | list[str] | None, scheme: str, name: str, port: str
) -> None:
    headers: dict[str, str | list[str]] = {"URL_SCHEME": scheme}
    if host is not None:
        headers["host"] = host
    request = make_request(headers)
    environ = m.environ_from_request(request)
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == (name, port)
    assert m.url_scheme(request) == scheme


@pytest.mark.parametrize(
    ("sent", "scheme"),
    [("https", "https"), ("HTTPS", "https"), ("http", "http"), ("gopher", "http"), (None, "http")],
)
def test_url_scheme(sent: str | None, scheme: str) -> None:
    request = make_request({} if sent is None else {"URL_SCHEME": sent})
    assert m.url_scheme(request) == scheme


def test_client_headers() -> None:
    request = make_request(
        {
            "QUERY": "a=%20&b",
            "REMOTE_ADDR": "10.0.0.1",
            "content-type": "text/plain",
            "content-length": "3",
            "x-multi": ["1", "2", "3"],
            "cookie": ["a=1", "b=2"],
            "accept-encoding": "gzip",
            "x_user": "admin",  # would pose as x-user: dropped
            "x.dot": "1",
            "x-mongrel2-upload-start": "tmp/upload.abcdef",
            "x-mongrel2-upload-done": "tmp/upload.abcdef",
            "x-mongrel2-other": "kept",
            "DOWNLOAD_CREDITS": "1",  # an upper-case key is Mongrel2's own, never a header
        },
        b"abc",
    )
    environ = m.environ_from_request(request)
    assert environ["QUERY_STRING"] == "a=%20&b"
    assert environ["REMOTE_ADDR"] == "10.0.0.1"
    assert environ["CONTENT_TYPE"] == "text/plain"
    assert environ["CONTENT_LENGTH"] == "3"
    assert environ["HTTP_X_MULTI"] == "1, 2, 3"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["HTTP_ACCEPT_ENCODING"] == "gzip"
    assert environ["HTTP_X_MONGREL2_OTHER"] == "kept"
    http = sorted(k for k in environ if k.startswith("HTTP_"))
    assert http == ["HTTP_ACCEPT_ENCODING", "HTTP_COOKIE", "HTTP_X_MONGREL2_OTHER", "HTTP_X_MULTI"]
    assert all(type(v) is str for v in environ.values())


def test_content_length() -> None:
    assert "CONTENT_LENGTH" not in m.environ_from_request(make_request({}))
    assert m.environ_from_request(make_request({}, b"12345"))["CONTENT_LENGTH"] == "5"
    given = make_request({"content-length": "9"}, b"")  # an upload: the body is in a file
    assert m.environ_from_request(given)["CONTENT_LENGTH"] == "9"
    assert "CONTENT_TYPE" not in m.environ_from_request(make_request({}))


def run_validated_app(request: m.Request) -> bytes:
    """Run an app under wsgiref.validate with the request's environ: it echoes the body."""
    import io
    import sys

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size)
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]

    environ: dict[str, Any] = dict(m.environ_from_request(request))
    environ.update(
        {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": m.url_scheme(request),
            "wsgi.input": io.BytesIO(request.body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
    )
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    result = wsgiref.validate.validator(app)(environ, start_response)
    try:
        out = b"".join(result)
    finally:
        result.close()  # type: ignore[attr-defined]
    assert statuses == ["200 OK"]
    return out


# --------------------------------------------------------------------------- keep-alive, heads

KEEP_ALIVE = [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.1", "Close", False),
    ("HTTP/1.1", "keep-alive, close", False),
    ("HTTP/1.1", ["foo", "close"], False),
    ("HTTP/1.1", "upgrade", True),
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "keep-alive", True),
    ("HTTP/1.0", "Keep-Alive", True),
    ("HTTP/1.0", " keep-alive ,foo", True),
    ("HTTP/1.0", "keep-alive, close", False),
    ("HTTP/1.0", "keep-alive-ish", False),
    ("HTTP/0.9", None, False),
    (None, None, False),
]


@pytest.mark.parametrize(("version", "connection", "expected"), KEEP_ALIVE)
def test_keep_alive(
    version: str | None, connection: str | list[str] | None, expected: bool
) -> None:
    headers: dict[str, str | list[str]] = {"METHOD": "GET"}
    if version is not None:
        headers["VERSION"] = version
    if connection is not None:
        headers["connection"] = connection
    assert m.keep_alive(m.Request("u", "1", "/", headers, b"")) is expected


HEADS = [
    ("HTTP/1.1", False, False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n"),
    (
        "HTTP/1.1",
        True,
        False,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    (
        "HTTP/1.1",
        False,
        True,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nConnection: close\r\n\r\n",
    ),
    (
        "HTTP/1.1",
        True,
        True,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    ),
    (
        "HTTP/1.0",
        False,
        True,
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nConnection: close\r\n\r\n",
    ),
    (
        "HTTP/1.0",
        False,
        False,
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nConnection: keep-alive\r\n\r\n",
    ),
    (
        "HTTP/0.9",
        False,
        True,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nConnection: close\r\n\r\n",
    ),
]


@pytest.mark.parametrize(("version", "chunked", "close", "head"), HEADS)
def test_response_head(version: str, chunked: bool, close: bool, head: bytes) -> None:
    request = make_request({"VERSION": version})
    headers = [("Content-Length", "2"), ("X-A", "b")]
    assert m.response_head(request, "200 OK", headers, chunked=chunked, close=close) == head


def test_response_head_latin1_and_errors() -> None:
    request = make_request({})
    head = m.response_head(
        request, "404 Introuvable", [("X-L", "caf\u00e9")], chunked=False, close=False
    )
    assert head == b"HTTP/1.1 404 Introuvable\r\nX-L: caf\xe9\r\n\r\n"
    with pytest.raises(ValueError, match=r"HTTP/1\.0"):
        m.response_head(
            make_request({"VERSION": "HTTP/1.0"}), "200 OK", [], chunked=True, close=True
        )


@pytest.mark.parametrize(
    ("data", "chunk"),
    [
        (b"abc", b"3\r\nabc\r\n"),
        (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
        (b"\r\n", b"2\r\n\r\n\r\n"),
        (b"", b""),
    ],
)
def test_encode_chunk(data: bytes, chunk: bytes) -> None:
    assert m.encode_chunk(data) == chunk
    assert m.LAST_CHUNK == b"0\r\n\r\n"


# --------------------------------------------------------------------------- replies

REPLIES = [
    ("aaaa-tnet", ["1"], b"HTTP/1.1 200 OK\r\n\r\n", b"aaaa-tnet 1:1, HTTP/1.1 200 OK\r\n\r\n"),
    ("u", ["1", "22", "333"], b"x", b"u 8:1 22 333, x"),
    ("u", ["7"], b"", b"u 1:7, "),
    ("u", ("5",), b" ", b"u 1:5,  "),
]


@pytest.mark.parametrize(("sender", "ids", "payload", "wire"), REPLIES)
def test_encode_and_parse_reply(
    sender: str, ids: Iterable[str], payload: bytes, wire: bytes
) -> None:
    assert m.encode_reply(sender, ids, payload) == wire
    assert m.parse_reply(wire) == (sender, list(ids), payload)


@pytest.mark.parametrize(
    ("sender", "conn_id"), [("u", "7"), ("aaaa-tnet", "12345"), ("s\u00e9", "0")]
)
def test_reply_prefix(sender: str, conn_id: str) -> None:
    assert m.reply_prefix(sender, conn_id) == m.encode_reply(sender, [conn_id], b"")


@pytest.mark.parametrize("ids", [[], ["a"], ["", "1"], ["1", "-2"], ["1" * 21]])
def test_encode_reply_bad_ids(ids: list[str]) -> None:
    with pytest.raises(ValueError):
        m.encode_reply("u", ids, b"x")


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"u",
        b"u 1:1,",
        b"u 1:1,x",
        b"u 1:a, x",
        b"u 2:1 , x",
        b"u 3:1#, x",
        b" 1:1, x",
        b"u 9:1, x",
    ],
)
def test_parse_reply_malformed(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        m.parse_reply(wire)


# --------------------------------------------------------------------------- request properties


@pytest.mark.parametrize(
    ("method", "body", "expected"),
    [
        ("JSON", b'{"type":"disconnect"}', True),
        ("JSON", b'{"type": "disconnect"}', True),
        ("JSON", b'{"type":"other"}', False),
        ("JSON", b'{"type":"disconnect","x":1}', False),
        ("JSON", b"not json", False),
        ("JSON", b"\xff", False),
        ("JSON", b"", False),
        ("GET", b'{"type":"disconnect"}', False),
        ("POST", b'{"type":"disconnect"}', False),
    ],
)
def test_is_disconnect(method: str, body: bytes, expected: bool) -> None:
    assert m.Request("u", "1", "@*", {"METHOD": method}, body).is_disconnect is expected


UPLOAD = "tmp/upload.abcdef"


@pytest.mark.parametrize(
    ("start", "done", "body", "stage"),
    [
        (None, None, b"", None),
        (None, None, b"abc", None),
        (UPLOAD, None, b"", "start"),
        (UPLOAD, UPLOAD, b"", "done"),
        (None, UPLOAD, b"", "without"),
        ("", None, b"", "without"),
        (UPLOAD, "tmp/upload.zzzzzz", b"", "another file"),
        (UPLOAD, None, b"x", "inline body"),
        (UPLOAD, UPLOAD, b"x", "inline body"),
        ([UPLOAD, UPLOAD], None, b"", "repeated"),
        (UPLOAD, [UPLOAD, UPLOAD], b"", "repeated"),
    ],
)
def test_upload_stage(start: Any, done: Any, body: bytes, stage: str | None) -> None:
    headers: dict[str, str | list[str]] = {"METHOD": "POST"}
    if start is not None:
        headers[m.UPLOAD_START] = start
    if done is not None:
        headers[m.UPLOAD_DONE] = done
    request = m.Request("u", "1", "/", headers, body)
    if stage in (None, "start", "done"):
        assert m.upload_stage(request) == stage
    else:
        with pytest.raises(m.UploadError, match=stage):
            m.upload_stage(request)
    if isinstance(start, list):
        assert request.upload_start == f"{UPLOAD}, {UPLOAD}"


# --------------------------------------------------------------------------- properties

token = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-"), min_size=1, max_size=12)
latin1 = st.text(st.characters(max_codepoint=255), max_size=30)
header_values = st.one_of(latin1, st.lists(latin1, min_size=1, max_size=3))
headers_strategy = st.dictionaries(
    st.one_of(token, st.sampled_from(["METHOD", "PATH", "QUERY", "VERSION", "PATTERN"])),
    header_values,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(
    token,
    st.integers(0, 10**20 - 1),
    st.text(st.characters(min_codepoint=33, max_codepoint=255), min_size=1, max_size=30),
    headers_strategy,
    st.binary(max_size=200),
    st.booleans(),
)
def test_roundtrip(
    sender: str, conn_id: int, path: str, headers: dict[str, Any], body: bytes, json: bool
) -> None:
    wire = m.encode_request(sender, str(conn_id), path, headers, body, json=json)
    request = m.parse_request(wire)
    assert request == m.Request(sender, str(conn_id), path, headers, body)
    environ = m.environ_from_request(request)
    assert all(type(k) is str and type(v) is str for k, v in environ.items())
    for value in environ.values():
        value.encode("latin-1")  # WSGI native strings


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    for wire in (data, b"u 1 /p " + data):
        try:
            request = m.parse_request(wire, max_headers_size=200, max_body_size=200)
        except RemoteProtocolError:
            continue
        check_request(request)


def check_request(request: m.Request) -> None:
    """A parsed request: the declared types, and everything downstream is total."""
    assert type(request.sender) is str and request.sender
    assert request.conn_id.isdigit()
    assert type(request.body) is bytes
    for key, value in request.headers.items():
        assert type(key) is str
        assert type(value) is str or (
            type(value) is list and value and all(type(v) is str for v in value)
        )
    environ = m.environ_from_request(request)
    assert all(type(v) is str for v in environ.values())
    m.keep_alive(request)
    m.url_scheme(request)
    assert isinstance(request.is_disconnect, bool)
    try:
        m.upload_stage(request)
    except m.UploadError:
        pass


golden_wires = st.sampled_from([golden(f"{k}_{n}") for k in KINDS for n in GOLDEN_NAMES])


@settings(max_examples=1000, deadline=None)
@given(golden_wires, st.integers(0, 500), st.binary(min_size=1, max_size=6), st.booleans())
def test_fuzz_mutated_captures(wire: bytes, where: int, junk: bytes, insert: bool) -> None:
    pos = where % (len(wire) + 1)
    data = wire[:pos] + junk + wire[pos + (0 if insert else len(junk)) :]
    try:
        request = m.parse_request(data)
    except RemoteProtocolError:
        return
    check_request(request)


# --------------------------------------------------------------------------- the fast paths
#
# parse_request reads Mongrel2's usual messages with a fast path and leaves anything else to
# the general parser (``_parse_request``); both must agree on every message: the same
# Request, or both a RemoteProtocolError.


def outcome(parse: Any, wire: bytes, **bounds: int) -> m.Request | str:
    try:
        return parse(wire, **bounds)  # type: ignore[no-any-return]
    except RemoteProtocolError:
        return "error"


def general(wire: bytes, max_headers_size: int = 65536, max_body_size: int = 2**26) -> m.Request:
    return m._parse_request(wire, max_headers_size, max_body_size)


def check_agree(wire: bytes, **bounds: int) -> m.Request | str:
    fast = outcome(m.parse_request, wire, **bounds)
    assert fast == outcome(general, wire, **bounds)
    # again, now that the header names it saw are known to the fast path
    assert outcome(m.parse_request, wire, **bounds) == fast
    return fast


# text that makes tnetstrings and JSON tricky: separators, digits, tags, non-ASCII
tricky = st.text(st.sampled_from('ab:,0123456789}]~#!^ "\\\u00e9\u0100'), max_size=12)
LONG_VALUES = ["v" * 1023, "w" * 1024, "x" * 1500, "a," * 600, "0:" * 700, "," * 1100]
fast_keys = st.one_of(token, tricky, st.sampled_from(["METHOD", "PATH", "x-\u00e9", "k:1", ""]))
fast_values = st.one_of(
    tricky, latin1, st.sampled_from(LONG_VALUES), st.lists(tricky, min_size=1, max_size=3)
)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(fast_keys, fast_values, max_size=6),
    st.binary(max_size=40),
    st.booleans(),
    st.data(),
)
def test_fast_path_agrees_with_general_parser(
    headers: dict[str, Any], body: bytes, json: bool, data: st.DataObject
) -> None:
    try:
        wire = m.encode_request("u-1", "42", "/p", headers, body, json=json)
    except UnicodeEncodeError:  # a value that is not latin-1 (U+0100): no such message
        wire = m.encode_request("u-1", "42", "/p", {}, body, json=json)
    assert check_agree(wire) == m.Request("u-1", "42", "/p", wire_headers(wire), body)
    # and every kind of damage: a byte replaced, inserted or removed, the message cut
    for _ in range(4):
        pos = data.draw(st.integers(0, len(wire)))
        byte = data.draw(st.sampled_from(b"0123456789:,}]# \xe9x"))
        kind = data.draw(st.sampled_from(["replace", "insert", "remove", "cut"]))
        if kind == "replace":
            damaged = wire[:pos] + bytes([byte]) + wire[pos + 1 :]
        elif kind == "insert":
            damaged = wire[:pos] + bytes([byte]) + wire[pos:]
        elif kind == "remove":
            damaged = wire[:pos] + wire[pos + 1 :]
        else:
            damaged = wire[:pos]
        check_agree(damaged)
        check_agree(damaged, max_headers_size=64, max_body_size=8)


def wire_headers(wire: bytes) -> dict[str, Any]:
    return general(wire).headers


def msg_with(headers: bytes, body: bytes = b"0:,", tag: bytes = b"}") -> bytes:
    """A message whose headers are the tnetstring (or, with tag b",", JSON) payload given."""
    return b"u 1 / " + ns(headers, tag) + body


FAST_CASES = [
    # a piece without its colon: "0" must not pass for an empty "0:"
    msg_with(b"0,0,"),
    msg_with(b"0,1:b,"),
    msg_with(b"1:a,0,"),
    msg_with(b"1:a,2:bc,0,"),
    msg_with(b"0,1:a,0,"),
    msg_with(b"1:a,12,abcdefghijk,"),
    msg_with(b"1:a,12,abcdefghij,"),
    # a value holding commas, and ones whose commas add up wrongly
    msg_with(b"1:a,4:b,,c,"),
    msg_with(b"1:a,4:b,c,,"),
    msg_with(b"1:a,5:b,,c,"),
    msg_with(b"1:a,3:b,,c,"),
    msg_with(b"1:a,3:,,,"),
    msg_with(b"1:a,3:,,,,"),
    msg_with(b"1:a,1025:" + b"x," * 512 + b"y,"),
    msg_with(b"1:a,1025:" + b"x," * 512 + b","),
    msg_with(b"1:a,01025:" + b"x," * 512 + b"y,"),
    msg_with(b"1:a,1024:" + b"x" * 1024 + b","),
    msg_with(b"1:a,01024:" + b"x" * 1024 + b","),
    msg_with(b"1:a,1024:" + b"x" * 1025 + b","),
    # lengths with a leading zero, a sign, a space, non-ASCII digits
    msg_with(b"1:a,01:b,"),
    msg_with(b"1:a,01:b,,"),
    msg_with(b"1:a,02:b,,"),
    msg_with(b"1:a,+1:b,"),
    msg_with(b"1:a, 1:b,"),
    msg_with(b"1:a,\xb9:b,"),  # a latin-1 digit that is not ASCII (superscript one)
    msg_with(b"1:a,\xb9:b,,"),
    msg_with(b"\xb9:a,1:b,"),
    # bytes after the last item
    msg_with(b"1:a,1:b,x"),
    msg_with(b"1:a,1:b"),
    msg_with(b"01:a,1:b,"),
    msg_with(b"1:a,1:b,", b"00:,"),
    msg_with(b"1:a,1:b,", b"01:x,"),
    b"u 1 / 08:1:a,1:b,}0:,",
    # a repeated key, an odd number of items, non-string items
    msg_with(b"1:a,1:b,1:a,1:c,"),
    msg_with(b"1:a,1:b,1:c,"),
    msg_with(b"1:a,1:1#"),
    msg_with(b"1:a,4:true!"),
    msg_with(b"1:a,0:~"),
    msg_with(b"1:a," + ns(b"1:b,1:c,", b"]")),
    msg_with(b"1:a," + ns(b"1:b,", b"}")),
    # non-ASCII keys: the general parser's (UTF-8 or an error)
    msg_with(b"4:x-\xc3\xa9,1:b,"),
    msg_with(b"4:x-\xff\xfe,1:b,"),
    # JSON: whitespace around the object, trailing data, lists, bad values
    msg_with(b' {"a":"b"} ', tag=b","),
    msg_with(b'{"a":"b"}x', tag=b","),
    msg_with(b'{"a":["b","c"]}', tag=b","),
    msg_with(b'{"a":"b","a":"c"}', tag=b","),
    msg_with(b'{"a":1}', tag=b","),
    msg_with(b'{"a":"b\x01"}', tag=b","),
    msg_with(b'{"a":NaN}', tag=b","),
    msg_with(b"{}", tag=b","),
    msg_with(b"", tag=b","),
    msg_with(b"[" * 5000, tag=b","),
    # bodies
    msg_with(b"", b"3:abc,"),
    msg_with(b"", b"3:abc,,"),
    msg_with(b"", b"3:abc}"),
    msg_with(b"", b"4:abc,"),
    msg_with(b"", b"0:,x"),
    msg_with(b"", b"0:}"),
    msg_with(b"", b""),
    # the envelope
    b"u  1 / 0:}0:,",
    b"u 1  / 0:}0:,",
    b"u 01 / 0:}0:,",
    b"u 1 /a b 0:}0:,",
    b"u\n 1 / 0:}0:,",
]


@pytest.mark.parametrize("wire", FAST_CASES)
def test_fast_path_cases(wire: bytes) -> None:
    check_agree(wire)
    check_agree(wire, max_headers_size=3, max_body_size=2)


def test_fast_path_long_and_comma_values() -> None:
    headers: dict[str, str | list[str]] = {
        "METHOD": "GET",
        "accept": "text/html,application/xhtml+xml,*/*;q=0.8",
        "cookie": "a=" + "x" * 3000,
        "x-both": "1,2:3," * 400,
        "x-list": ["a,b", "c"],
    }
    for json in (False, True):
        wire = m.encode_request("u", "1", "/", headers, b"body", json=json)
        assert check_agree(wire) == m.Request("u", "1", "/", headers, b"body")


def test_fast_path_key_cache_is_bounded() -> None:
    """Header names a client chooses fill a bounded table; past it, names still parse."""
    for n in range(m._MAX_KEY_ITEMS + 50):
        headers = {f"x-{n}": "a", "x-" + "y" * 70: "b"}
        wire = m.encode_request("u", "1", "/", headers)
        assert m.parse_request(wire).headers == headers
    assert len(m._KEY_ITEMS) <= m._MAX_KEY_ITEMS
    assert all(len(item) <= m._MAX_KEY_ITEM for item in m._KEY_ITEMS)


def test_wsgi_environ() -> None:
    """wsgi_environ: a copy of the base, the CGI keys and wsgi.url_scheme."""
    base = {"wsgi.version": (1, 0), "wsgi.run_once": False}
    for scheme in ("http", "HTTPS", None):
        headers: dict[str, str | list[str]] = {"PATTERN": "/app/", "PATH": "/app/x%20y"}
        if scheme is not None:
            headers["URL_SCHEME"] = scheme
        request = make_request(headers, b"abc")
        environ = m.wsgi_environ(request, base)
        expected: dict[str, Any] = dict(base)
        expected.update(m.environ_from_request(request))
        expected["wsgi.url_scheme"] = m.url_scheme(request)
        assert environ == expected
        assert environ["PATH_INFO"] == "/x y" and environ["SCRIPT_NAME"] == "/app"
        assert environ["CONTENT_LENGTH"] == "3"
    assert base == {"wsgi.version": (1, 0), "wsgi.run_once": False}


def test_environ_list_values_of_server_keys() -> None:
    """Server keys are never lists from Mongrel2, but a parsed message may have them: the
    first value counts, as for the host header."""
    request = make_request(
        {
            "PATH": ["/app/a", "/b"],
            "PATTERN": ["/app", "/"],
            "METHOD": ["PUT", "GET"],
            "QUERY": ["q=1", "q=2"],
            "URI": ["/app/a?q=1"],
            "VERSION": ["HTTP/1.0"],
            "REMOTE_ADDR": ["10.0.0.2", "10.0.0.3"],
            "URL_SCHEME": ["https"],
            "host": ["", "example.com:81"],
        }
    )
    environ = m.environ_from_request(request)
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/app", "/a")
    assert environ["REQUEST_METHOD"] == "PUT"
    assert environ["QUERY_STRING"] == "q=1"
    assert environ["REQUEST_URI"] == "/app/a?q=1"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert environ["REMOTE_ADDR"] == "10.0.0.2"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("localhost", "80")
    assert environ["HTTP_HOST"] == ", example.com:81"


def test_environ_mount_table_is_bounded() -> None:
    for n in range(m._MAX_MOUNTS + 20):
        pattern = f"/m{n}/" + ("(.*)" if n % 2 else "")
        environ = m.environ_from_request(make_request({"PATTERN": pattern, "PATH": f"/m{n}/x"}))
        assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == (f"/m{n}", "/x")
    long = "/" + "p" * (m._MAX_MOUNT_PATTERN + 1)
    environ = m.environ_from_request(make_request({"PATTERN": long, "PATH": long + "/x"}))
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == (long, "/x")
    assert len(m._MOUNTS) <= m._MAX_MOUNTS
    assert long not in m._MOUNTS


def test_environ_host_table_is_bounded() -> None:
    """Host headers fill a bounded table; the scheme's default port is never kept in it."""
    for n in range(m._MAX_HOSTS + 20):
        for scheme, port in (("http", "80"), ("https", "443")):
            request = make_request({"host": f"h{n}.example", "URL_SCHEME": scheme})
            environ = m.environ_from_request(request)
            assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == (f"h{n}.example", port)
    long = "h" * (m._MAX_HOST + 1)
    environ = m.environ_from_request(make_request({"host": long + ":8"}))
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == (long, "8")
    assert len(m._HOSTS) <= m._MAX_HOSTS
    assert long + ":8" not in m._HOSTS
