"""The SCGI sans-I/O core (and the CGI response head): tables, bounds, fuzzing, nginx captures.

The wire bytes in the table are written by hand from the SCGI specification; the table drives
both ``encode_request`` and the parser. Every input is fed whole, a byte at a time, in uneven
chunks, and with trailing data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaussette.protocols import scgi as s
from chaussette.protocols.cgi import encode_head
from chaussette.protocols.errors import RemoteProtocolError

EVENT_TYPES = (s.Request, s.BodyData, s.BodyEnd)


def feed_whole(conn: s.ServerConnection, data: bytes) -> list[s.Event]:
    return conn.receive_data(data)


def feed_bytewise(conn: s.ServerConnection, data: bytes) -> list[s.Event]:
    events: list[s.Event] = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    return events


def feed_uneven(conn: s.ServerConnection, data: bytes) -> list[s.Event]:
    events: list[s.Event] = []
    sizes = [2, 1, 5, 17, 3, 64]
    pos = 0
    i = 0
    while pos < len(data):
        events += conn.receive_data(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return events


FEEDS = {"whole": feed_whole, "bytewise": feed_bytewise, "uneven": feed_uneven}
Feed = Callable[[s.ServerConnection, bytes], list[s.Event]]


@pytest.fixture(params=list(FEEDS))
def feed(request: pytest.FixtureRequest) -> Feed:
    return FEEDS[request.param]


def collapse(events: list[s.Event]) -> tuple[dict[str, str] | None, bytes, int]:
    """(params, body, number of BodyEnd), checking the order of events."""
    assert events, "no events"
    assert isinstance(events[0], s.Request)
    assert all(isinstance(e, s.BodyData) and e.data for e in events[1:-1])
    ends = sum(isinstance(e, s.BodyEnd) for e in events)
    if ends:
        assert isinstance(events[-1], s.BodyEnd)
    body = b"".join(e.data for e in events if isinstance(e, s.BodyData))
    return events[0].params, body, ends


# (id, headers given to encode_request, body, the bytes on the wire, the params decoded)
CASES = [
    (
        "spec-example",
        [
            (b"CONTENT_LENGTH", b"27"),
            (b"SCGI", b"1"),
            (b"REQUEST_METHOD", b"POST"),
            (b"REQUEST_URI", b"/deepthought"),
        ],
        b"What is the answer to life?",
        b"70:CONTENT_LENGTH\x0027\x00SCGI\x001\x00REQUEST_METHOD\x00POST\x00"
        b"REQUEST_URI\x00/deepthought\x00,What is the answer to life?",
        {
            "CONTENT_LENGTH": "27",
            "SCGI": "1",
            "REQUEST_METHOD": "POST",
            "REQUEST_URI": "/deepthought",
        },
    ),
    (
        "no-body",
        [(b"REQUEST_METHOD", b"GET"), (b"QUERY_STRING", b"")],
        b"",
        b"57:CONTENT_LENGTH\x000\x00SCGI\x001\x00REQUEST_METHOD\x00GET\x00QUERY_STRING\x00\x00,",
        {"CONTENT_LENGTH": "0", "SCGI": "1", "REQUEST_METHOD": "GET", "QUERY_STRING": ""},
    ),
    (
        "latin-1",
        [(b"PATH_INFO", b"/caf\xe9"), (b"HTTP_X", b"\xff")],
        b"\x00\x01",
        b"49:CONTENT_LENGTH\x002\x00SCGI\x001\x00PATH_INFO\x00/caf\xe9\x00HTTP_X\x00\xff\x00,"
        b"\x00\x01",
        {
            "CONTENT_LENGTH": "2",
            "SCGI": "1",
            "PATH_INFO": "/caf\xe9",
            "HTTP_X": "\xff",
        },
    ),
    (
        "repeated-name-last-wins",
        [(b"A", b"1"), (b"A", b"2")],
        b"",
        b"32:CONTENT_LENGTH\x000\x00SCGI\x001\x00A\x001\x00A\x002\x00,",
        {"CONTENT_LENGTH": "0", "SCGI": "1", "A": "2"},
    ),
    (
        "big-body",
        [],
        b"0123456789" * 10_000,
        b"29:CONTENT_LENGTH\x00100000\x00SCGI\x001\x00," + b"0123456789" * 10_000,
        {"CONTENT_LENGTH": "100000", "SCGI": "1"},
    ),
]
IDS = [case[0] for case in CASES]
CASE_ARGS = ("name", "headers", "body", "wire", "params")


@pytest.mark.parametrize(CASE_ARGS, CASES, ids=IDS)
def test_encode(
    name: str, headers: list[tuple[bytes, bytes]], body: bytes, wire: bytes, params: dict[str, str]
) -> None:
    assert s.encode_request(headers, body) == wire


@pytest.mark.parametrize(CASE_ARGS, CASES, ids=IDS)
def test_decode(
    name: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    wire: bytes,
    params: dict[str, str],
    feed: Feed,
) -> None:
    if name == "big-body" and feed is feed_bytewise:
        wire = wire[:200]  # the head and a part of the body, a byte at a time
        conn = s.ServerConnection()
        got_params, got_body, ends = collapse(feed(conn, wire))
        assert (got_params, got_body, ends) == (params, wire[33:], 0)
        assert conn.body_remaining == 100_000 - len(wire[33:])
        return
    conn = s.ServerConnection()
    assert collapse(feed(conn, wire)) == (params, body, 1)
    assert conn.body_remaining == 0
    assert conn.receive_data(b"") == []


@pytest.mark.parametrize(CASE_ARGS, CASES, ids=IDS)
def test_decode_with_trailing_data(
    name: str, headers: list[tuple[bytes, bytes]], body: bytes, wire: bytes, params: dict[str, str]
) -> None:
    """One request per connection: any byte past CONTENT_LENGTH is an error."""
    with pytest.raises(RemoteProtocolError, match="1 bytes beyond CONTENT_LENGTH"):
        s.ServerConnection().receive_data(wire + b"X")
    conn = s.ServerConnection()
    assert collapse(conn.receive_data(wire)) == (params, body, 1)
    with pytest.raises(RemoteProtocolError, match="3 bytes beyond CONTENT_LENGTH"):
        conn.receive_data(b"GET")
    with pytest.raises(RemoteProtocolError, match="beyond"):  # dead from then on
        conn.receive_data(b"")


@pytest.mark.parametrize(CASE_ARGS, CASES, ids=IDS)
def test_peer_closes_early(
    name: str, headers: list[tuple[bytes, bytes]], body: bytes, wire: bytes, params: dict[str, str]
) -> None:
    step = max(1, len(wire) // 150)
    for cut in range(1, len(wire), step):
        conn = s.ServerConnection()
        conn.receive_data(wire[:cut])
        with pytest.raises(RemoteProtocolError, match="peer closed"):
            conn.receive_data(b"")


def test_close_without_sending_anything_is_not_an_error() -> None:
    assert s.ServerConnection().receive_data(b"") == []


def test_netstring() -> None:
    assert s.encode_netstring(b"") == b"0:,"
    assert s.encode_netstring(b"hello world!") == b"12:hello world!,"


def test_encode_request_keeps_given_order() -> None:
    # given CONTENT_LENGTH and SCGI stay where they are: lets a test build a bad request
    wire = s.encode_request([(b"SCGI", b"1"), (b"CONTENT_LENGTH", b"0")], b"")
    assert wire == b"24:SCGI\x001\x00CONTENT_LENGTH\x000\x00,"


def block(*strings: bytes) -> bytes:
    return s.encode_netstring(b"".join(x + b"\0" for x in strings))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            block(b"SCGI", b"1", b"CONTENT_LENGTH", b"0"),
            "first header is 'SCGI', not CONTENT_LENGTH",
        ),
        (block(b"REQUEST_METHOD", b"GET"), "first header is 'REQUEST_METHOD'"),
        (block(b"CONTENT_LENGTH", b"0"), "SCGI header is None"),
        (block(b"CONTENT_LENGTH", b"0", b"SCGI", b"2"), "SCGI header is '2'"),
        (block(b"CONTENT_LENGTH", b"0", b"SCGI", b""), "SCGI header is ''"),
        (block(b"CONTENT_LENGTH", b"-1", b"SCGI", b"1"), "bad CONTENT_LENGTH '-1'"),
        (block(b"CONTENT_LENGTH", b"", b"SCGI", b"1"), "bad CONTENT_LENGTH ''"),
        (block(b"CONTENT_LENGTH", b"+5", b"SCGI", b"1"), "bad CONTENT_LENGTH"),
        (block(b"CONTENT_LENGTH", b" 5", b"SCGI", b"1"), "bad CONTENT_LENGTH"),
        (block(b"CONTENT_LENGTH", b"1e3", b"SCGI", b"1"), "bad CONTENT_LENGTH"),
        (block(b"CONTENT_LENGTH", b"\xb2", b"SCGI", b"1"), "bad CONTENT_LENGTH"),  # superscript 2
        (block(b"CONTENT_LENGTH", b"9" * 19, b"SCGI", b"1"), "bad CONTENT_LENGTH"),
        (
            block(b"CONTENT_LENGTH", b"0", b"SCGI", b"1", b"CONTENT_LENGTH", b"5"),
            "CONTENT_LENGTH repeated",
        ),
        (block(b"CONTENT_LENGTH", b"0", b"SCGI", b"1", b"ODD"), "name without a value"),
        (b"25:CONTENT_LENGTH\x000\x00SCGI\x001\x00X;", "not terminated by ','"),
        (b"25:CONTENT_LENGTH\x000\x00SCGI\x001\x00X,", "does not end with NUL"),
        (b"0:,", "does not end with NUL"),
        (b":,", "bad netstring length b''"),
        (b"1a:x,", "netstring length"),
        (b"-1:x,", "netstring length"),
        (b"GET / HTTP/1.1\r\n\r\n", "does not start with a netstring length: b'G"),
        (b"\x01\x01\x00\x01\x00\x08\x00\x00", "does not start with a netstring length"),
        (b"99999:", "header block of 99999 bytes, over 65536"),
        (b"1234567", "does not start with a netstring length"),  # 7 digits, no colon
    ],
)
def test_malformed(wire: bytes, message: str, feed: Feed) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        feed(s.ServerConnection(), wire)


def test_header_block_bound() -> None:
    wire = s.encode_request([(b"X", b"v" * 950)], b"")
    size = int(wire.split(b":", 1)[0])
    params, _, ends = collapse(s.ServerConnection(max_params_size=size).receive_data(wire))
    assert params is not None and params["X"] == "v" * 950 and ends == 1
    conn = s.ServerConnection(max_params_size=size - 1)
    with pytest.raises(RemoteProtocolError, match=f"header block of {size} bytes, over {size - 1}"):
        conn.receive_data(wire[:5])


def test_garbage_fails_before_buffering() -> None:
    """A peer cannot make the core buffer a long header it will refuse anyway."""
    conn = s.ServerConnection(max_params_size=100)
    assert conn.receive_data(b"10") == []
    with pytest.raises(RemoteProtocolError, match="netstring length"):
        conn.receive_data(b"00")  # four digits: 1000 > 100 cannot be announced


def test_body_arrives_as_it_comes() -> None:
    conn = s.ServerConnection()
    head = s.encode_request([], b"abcdef")[:-6]
    assert [type(e) for e in conn.receive_data(head)] == [s.Request]
    assert conn.body_remaining == 6
    assert conn.receive_data(b"abc") == [s.BodyData(b"abc")]
    assert conn.receive_data(b"def") == [s.BodyData(b"def"), s.BodyEnd()]
    assert conn.body_remaining == 0


# --------------------------------------------------------------------------- hypothesis


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"", b"30:", b"30:CONTENT_LENGTH\x00", s.encode_request([], b"xy")[:-1]]),
    st.lists(st.binary(max_size=200), max_size=8),
)
def test_fuzz_arbitrary_bytes(start: bytes, chunks: list[bytes]) -> None:
    """Arbitrary bytes, alone or after a valid start: events or a RemoteProtocolError."""
    conn = s.ServerConnection(max_params_size=1000)
    for chunk in [*(c for c in [start, *chunks] if c), b""]:
        try:
            events = conn.receive_data(chunk)
        except RemoteProtocolError:
            return
        assert isinstance(events, list)
        assert all(isinstance(e, EVENT_TYPES) for e in events)
        assert len(conn._buf) <= 1000 + 6


latin1 = st.text(st.characters(max_codepoint=255, exclude_characters="\0"), max_size=80)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(latin1, latin1), max_size=6),
    st.binary(max_size=3000),
    st.data(),
)
def test_roundtrip(headers: list[tuple[str, str]], body: bytes, data: st.DataObject) -> None:
    encoded = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in headers
        if k not in ("CONTENT_LENGTH", "SCGI")
    ]
    wire = s.encode_request(encoded, body)
    cuts = sorted(data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=6)))
    conn = s.ServerConnection()
    events: list[s.Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        if a < b:
            events += conn.receive_data(wire[a:b])
    expected = {"CONTENT_LENGTH": str(len(body)), "SCGI": "1"}
    expected.update((k.decode("latin-1"), v.decode("latin-1")) for k, v in encoded)
    assert collapse(events) == (expected, body, 1)


# --------------------------------------------------------------------------- cgi head


@pytest.mark.parametrize(
    ("status", "headers", "wire"),
    [
        ("200 OK", [], b"Status: 200 OK\r\n\r\n"),
        (
            "404 Not Found",
            [("Content-Type", "text/plain"), ("Content-Length", "9")],
            b"Status: 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n",
        ),
        (
            "200 OK",
            [("Set-Cookie", "a=1"), ("Set-Cookie", "b=\xe9")],
            b"Status: 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=\xe9\r\n\r\n",
        ),
    ],
)
def test_encode_head(status: str, headers: list[tuple[str, str]], wire: bytes) -> None:
    assert encode_head(status, headers) == wire


# --------------------------------------------------------------------------- nginx captures
# Real bytes from nginx 1.22.1 scgi_pass (see tests/data/README.txt).

DATA = Path(__file__).resolve().parent / "data"
NGINX_COMMON = {
    "SCGI": "1",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REQUEST_SCHEME": "http",
    "REMOTE_ADDR": "127.0.0.1",
    "SERVER_NAME": "localhost",
    "HTTP_HOST": "127.0.0.1",
    "HTTP_USER_AGENT": "curl/7.88.1",
    "HTTP_ACCEPT": "*/*",
}


def test_nginx_scgi_get(feed: Feed) -> None:
    wire = (DATA / "nginx_scgi_get.bin").read_bytes()
    assert wire.startswith(b"401:CONTENT_LENGTH\x00")  # CONTENT_LENGTH first, as the spec says
    params, body, ends = collapse(feed(s.ServerConnection(), wire))
    assert params is not None
    expected = {
        **NGINX_COMMON,
        "CONTENT_LENGTH": "0",
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": "/scgi/get?x=1&name=caf%C3%A9",
        "QUERY_STRING": "x=1&name=caf%C3%A9",
        "CONTENT_TYPE": "",
        "DOCUMENT_URI": "/scgi/get",
        "PATH_INFO": "/scgi/get",
    }
    for key, value in expected.items():
        assert params[key] == value, key
    assert params["REMOTE_PORT"].isdigit() and params["SERVER_PORT"].isdigit()
    assert (body, ends) == (b"", 1)


def test_nginx_scgi_post(feed: Feed) -> None:
    wire = (DATA / "nginx_scgi_post.bin").read_bytes()
    params, body, ends = collapse(feed(s.ServerConnection(), wire))
    assert params is not None
    form = "application/x-www-form-urlencoded"
    expected = {
        **NGINX_COMMON,
        "CONTENT_LENGTH": "20",
        "REQUEST_METHOD": "POST",
        "REQUEST_URI": "/scgi/post?x=1",
        "QUERY_STRING": "x=1",
        "CONTENT_TYPE": form,
        "PATH_INFO": "/scgi/post",
        "HTTP_CONTENT_TYPE": form,
        "HTTP_CONTENT_LENGTH": "20",
    }
    for key, value in expected.items():
        assert params[key] == value, key
    assert (body, ends) == (b"name=chaussette&n=42", 1)


def test_nginx_scgi_over_params_bound() -> None:
    wire = (DATA / "nginx_scgi_post.bin").read_bytes()
    assert collapse(s.ServerConnection(max_params_size=484).receive_data(wire))[2] == 1
    with pytest.raises(RemoteProtocolError, match="header block of 484 bytes, over 483"):
        s.ServerConnection(max_params_size=483).receive_data(wire)
