"""The FastCGI sans-I/O core: codec tables, connection rules, bounds, fuzzing, nginx captures.

Expected bytes in the tables are written by hand from the FastCGI 1.0 specification, not
produced by the code under test; each table drives both the encoder and the decoder. Every
input goes through the parser whole, a byte at a time, in uneven chunks, and followed by
the start of something else (trailing data).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaussette.protocols import fastcgi as f
from chaussette.protocols.errors import RemoteProtocolError

DATA = Path(__file__).resolve().parent / "data"
EVENT_TYPES = (f.RequestStarted, f.Params, f.StdinData, f.StdinEnd, f.Aborted)


# --------------------------------------------------------------------------- feeding


def feed_whole(conn: f.ServerConnection, data: bytes) -> list[f.Event]:
    return conn.receive_data(data)


def feed_bytewise(conn: f.ServerConnection, data: bytes) -> list[f.Event]:
    events: list[f.Event] = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    return events


def feed_uneven(conn: f.ServerConnection, data: bytes) -> list[f.Event]:
    # chunk sizes that straddle headers, contents and paddings in every way
    events: list[f.Event] = []
    sizes = [3, 1, 7, 9, 2, 13, 64, 5]
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        events += conn.receive_data(data[pos : pos + size])
        pos += size
        i += 1
    return events


FEEDS = {"whole": feed_whole, "bytewise": feed_bytewise, "uneven": feed_uneven}
Feed = Callable[[f.ServerConnection, bytes], list[f.Event]]


@pytest.fixture(params=list(FEEDS))
def feed(request: pytest.FixtureRequest) -> Feed:
    return FEEDS[request.param]


def new_conn(**kwargs: object) -> f.ServerConnection:
    options: dict[str, object] = {"max_conns": 10, "max_reqs": 50}
    options.update(kwargs)
    return f.ServerConnection(**options)  # type: ignore[arg-type]


def records_of(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, request id, content length, padding length) of each record, parsed by hand."""
    out = []
    pos = 0
    while pos < len(data):
        version, rtype, rid, clen, plen, reserved = struct.unpack_from("!BBHHBB", data, pos)
        assert version == 1 and reserved == 0
        out.append((rtype, rid, clen, plen))
        pos += 8 + clen + plen
    assert pos == len(data)
    return out


def read_records(data: bytes) -> list[f.Record]:
    reader = f.RecordReader()
    records = reader.feed(data)
    assert reader.pending == 0
    return records


# --------------------------------------------------------------------------- record table

# (id, type, request id, content, padding or None, the bytes on the wire)
RECORD_CASES = [
    (
        "begin-responder-keep",
        f.BEGIN_REQUEST,
        1,
        b"\x00\x01\x01\x00\x00\x00\x00\x00",
        None,
        b"\x01\x01\x00\x01\x00\x08\x00\x00" + b"\x00\x01\x01\x00\x00\x00\x00\x00",
    ),
    (
        "begin-filter-close",
        f.BEGIN_REQUEST,
        0x1234,
        b"\x00\x03\x00\x00\x00\x00\x00\x00",
        None,
        b"\x01\x01\x12\x34\x00\x08\x00\x00" + b"\x00\x03\x00\x00\x00\x00\x00\x00",
    ),
    ("abort", f.ABORT_REQUEST, 7, b"", None, b"\x01\x02\x00\x07\x00\x00\x00\x00"),
    (
        "end-request",
        f.END_REQUEST,
        2,
        b"\x00\x00\x01\x02\x03\x00\x00\x00",
        None,
        b"\x01\x03\x00\x02\x00\x08\x00\x00" + b"\x00\x00\x01\x02\x03\x00\x00\x00",
    ),
    (
        "params-padded",
        f.PARAMS,
        1,
        b"\x01\x01AB",
        None,
        b"\x01\x04\x00\x01\x00\x04\x04\x00" + b"\x01\x01AB" + b"\0\0\0\0",
    ),
    ("params-end", f.PARAMS, 1, b"", None, b"\x01\x04\x00\x01\x00\x00\x00\x00"),
    (
        "stdin-7",
        f.STDIN,
        65535,
        b"1234567",
        None,
        b"\x01\x05\xff\xff\x00\x07\x01\x00" + b"1234567" + b"\0",
    ),
    ("stdin-8", f.STDIN, 3, b"12345678", None, b"\x01\x05\x00\x03\x00\x08\x00\x00" + b"12345678"),
    ("stdin-end", f.STDIN, 3, b"", None, b"\x01\x05\x00\x03\x00\x00\x00\x00"),
    (
        "stdout-9",
        f.STDOUT,
        1,
        b"x" * 9,
        None,
        b"\x01\x06\x00\x01\x00\x09\x07\x00" + b"x" * 9 + b"\0" * 7,
    ),
    ("stderr", f.STDERR, 1, b"oops\n", None, b"\x01\x07\x00\x01\x00\x05\x03\x00oops\n\0\0\0"),
    ("data", f.DATA, 9, b"\xff", None, b"\x01\x08\x00\x09\x00\x01\x07\x00\xff" + b"\0" * 7),
    (
        "get-values",
        f.GET_VALUES,
        0,
        b"\x0e\x00FCGI_MAX_CONNS",
        None,
        b"\x01\x09\x00\x00\x00\x10\x00\x00" + b"\x0e\x00FCGI_MAX_CONNS",
    ),
    (
        "get-values-result",
        f.GET_VALUES_RESULT,
        0,
        b"\x0f\x01FCGI_MPXS_CONNS1",
        None,
        b"\x01\x0a\x00\x00\x00\x12\x06\x00" + b"\x0f\x01FCGI_MPXS_CONNS1" + b"\0" * 6,
    ),
    (
        "unknown-type",
        f.UNKNOWN_TYPE,
        0,
        b"\x2a\0\0\0\0\0\0\0",
        None,
        b"\x01\x0b\x00\x00\x00\x08\x00\x00" + b"\x2a\0\0\0\0\0\0\0",
    ),
    ("type-42", 42, 0, b"?", None, b"\x01\x2a\x00\x00\x00\x01\x07\x00?" + b"\0" * 7),
    ("explicit-padding-0", f.STDOUT, 1, b"abc", 0, b"\x01\x06\x00\x01\x00\x03\x00\x00abc"),
    (
        "explicit-padding-255",
        f.STDOUT,
        1,
        b"",
        255,
        b"\x01\x06\x00\x01\x00\x00\xff\x00" + b"\0" * 255,
    ),
    (
        "max-content",
        f.STDIN,
        1,
        b"z" * 65535,
        None,
        b"\x01\x05\x00\x01\xff\xff\x01\x00" + b"z" * 65535 + b"\0",
    ),
]
RECORD_IDS = [case[0] for case in RECORD_CASES]


@pytest.mark.parametrize(
    ("name", "rtype", "rid", "content", "padding", "wire"), RECORD_CASES, ids=RECORD_IDS
)
def test_record_encode(
    name: str, rtype: int, rid: int, content: bytes, padding: int | None, wire: bytes
) -> None:
    assert f.encode_record(rtype, rid, content, padding) == wire


@pytest.mark.parametrize(
    ("name", "rtype", "rid", "content", "padding", "wire"), RECORD_CASES, ids=RECORD_IDS
)
@pytest.mark.parametrize("split", ["whole", "bytewise", "uneven"])
def test_record_decode(
    name: str, rtype: int, rid: int, content: bytes, padding: int | None, wire: bytes, split: str
) -> None:
    reader = f.RecordReader()
    if split == "whole":
        records = reader.feed(wire)
    elif split == "bytewise":
        records = []
        for i in range(len(wire)):
            records += reader.feed(wire[i : i + 1])
            if i < len(wire) - 1:
                assert records == [] and reader.pending == i + 1
    else:
        records = reader.feed(wire[:5]) + reader.feed(wire[5:11]) + reader.feed(wire[11:])
    assert records == [f.Record(rtype, rid, content)]
    assert reader.pending == 0


@pytest.mark.parametrize(
    ("name", "rtype", "rid", "content", "padding", "wire"), RECORD_CASES, ids=RECORD_IDS
)
def test_record_decode_with_trailing_data(
    name: str, rtype: int, rid: int, content: bytes, padding: int | None, wire: bytes
) -> None:
    following = f.encode_record(f.STDIN, 5, b"next")
    for cut in (1, 7, 8, len(following) - 1):
        reader = f.RecordReader()
        assert reader.feed(wire + following[:cut]) == [f.Record(rtype, rid, content)]
        assert reader.pending == cut
        assert reader.feed(following[cut:]) == [f.Record(f.STDIN, 5, b"next")]
        assert reader.pending == 0


def test_records_back_to_back_in_one_feed() -> None:
    wire = b"".join(case[5] for case in RECORD_CASES)
    expected = [f.Record(case[1], case[2], case[3]) for case in RECORD_CASES]
    assert read_records(wire) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"content": b"x" * 65536}, "65536"),
        ({"padding": 256}, "256"),
        ({"padding": -1}, "-1"),
        ({"request_id": 65536}, "65536"),
        ({"request_id": -1}, "-1"),
        ({"type": 256}, "256"),
    ],
)
def test_encode_record_out_of_range(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"type": f.STDOUT, "request_id": 1, "content": b""}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        f.encode_record(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, 2, 0x7F, 0xFF])
def test_bad_version_fails_on_first_byte(version: int) -> None:
    wire = bytes([version]) + f.encode_record(f.STDIN, 1, b"abc")[1:]
    with pytest.raises(RemoteProtocolError, match=f"version {version}"):
        f.RecordReader().feed(wire[:1])
    with pytest.raises(RemoteProtocolError, match=f"version {version}"):
        f.RecordReader().feed(wire)
    # after a good record too
    with pytest.raises(RemoteProtocolError, match=f"version {version}"):
        f.RecordReader().feed(f.encode_record(f.STDIN, 1, b"") + wire[:1])


def test_reader_holds_at_most_one_record() -> None:
    """The largest record allowed (8 + 65535 + 255 bytes) is buffered, never more."""
    wire = f.encode_record(f.STDIN, 1, b"q" * 65535, padding=255)
    assert len(wire) == f.MAX_RECORD_LEN == 8 + 65535 + 255
    reader = f.RecordReader()
    assert reader.feed(wire[:-1]) == []
    assert reader.pending == len(wire) - 1
    assert reader.feed(wire[-1:] + wire[:3]) == [f.Record(f.STDIN, 1, b"q" * 65535)]
    assert reader.pending == 3


# --------------------------------------------------------------------------- name-value table

# (id, pairs, the bytes on the wire)
PAIR_CASES = [
    ("empty", [], b""),
    ("one", [(b"A", b"b")], b"\x01\x01Ab"),
    ("empty-value", [(b"QUERY_STRING", b"")], b"\x0c\x00QUERY_STRING"),
    ("empty-name", [(b"", b"v")], b"\x00\x01v"),
    ("name-127", [(b"n" * 127, b"v")], b"\x7f\x01" + b"n" * 127 + b"v"),
    ("name-128", [(b"n" * 128, b"v")], b"\x80\x00\x00\x80\x01" + b"n" * 128 + b"v"),
    ("value-127", [(b"N", b"v" * 127)], b"\x01\x7fN" + b"v" * 127),
    ("value-128", [(b"N", b"v" * 128)], b"\x01\x80\x00\x00\x80N" + b"v" * 128),
    (
        "both-long",
        [(b"n" * 300, b"v" * 70000)],
        b"\x80\x00\x01\x2c\x80\x01\x11\x70" + b"n" * 300 + b"v" * 70000,
    ),
    (
        "several",
        [(b"REQUEST_METHOD", b"GET"), (b"X", b"v" * 128), (b"Y", b"")],
        b"\x0e\x03REQUEST_METHODGET\x01\x80\x00\x00\x80X" + b"v" * 128 + b"\x01\x00Y",
    ),
    ("repeated", [(b"A", b"1"), (b"A", b"2")], b"\x01\x01A1\x01\x01A2"),
    ("binary", [(b"\xff\x00", b"\x00\xe9")], b"\x02\x02\xff\x00\x00\xe9"),
]
PAIR_IDS = [case[0] for case in PAIR_CASES]


@pytest.mark.parametrize(("name", "pairs", "wire"), PAIR_CASES, ids=PAIR_IDS)
def test_pairs_encode(name: str, pairs: list[tuple[bytes, bytes]], wire: bytes) -> None:
    assert f.encode_pairs(pairs) == wire


@pytest.mark.parametrize(("name", "pairs", "wire"), PAIR_CASES, ids=PAIR_IDS)
def test_pairs_decode(name: str, pairs: list[tuple[bytes, bytes]], wire: bytes) -> None:
    assert f.decode_pairs(wire) == pairs


@pytest.mark.parametrize(("name", "pairs", "wire"), PAIR_CASES, ids=PAIR_IDS)
def test_pairs_decode_cut_anywhere(
    name: str, pairs: list[tuple[bytes, bytes]], wire: bytes
) -> None:
    """Cut at a pair boundary: the pairs before it; anywhere else: RemoteProtocolError."""
    boundaries = {len(f.encode_pairs(pairs[:i])): pairs[:i] for i in range(len(pairs) + 1)}
    step = 1 if len(wire) < 1000 else 997
    for cut in [*range(0, len(wire), step), len(wire) - 1]:
        if cut < 0:
            continue
        if cut in boundaries:
            assert f.decode_pairs(wire[:cut]) == boundaries[cut]
        else:
            with pytest.raises(RemoteProtocolError):
                f.decode_pairs(wire[:cut])


@pytest.mark.parametrize(("name", "pairs", "wire"), PAIR_CASES, ids=PAIR_IDS)
def test_pairs_decode_with_trailing_data(
    name: str, pairs: list[tuple[bytes, bytes]], wire: bytes
) -> None:
    # a complete pair after it decodes too; the start of a 4-byte length does not
    assert f.decode_pairs(wire + b"\x01\x01Zz") == [*pairs, (b"Z", b"z")]
    with pytest.raises(RemoteProtocolError):
        f.decode_pairs(wire + b"\x80\x00")
    with pytest.raises(RemoteProtocolError):
        f.decode_pairs(wire + b"\x05\x05abc")


def _through_params_cases() -> list[object]:
    # 70 000 one-byte records fed a byte at a time would take seconds and prove nothing the
    # smaller cases do not: the long case goes whole only with tiny records.
    cases = []
    for case in PAIR_CASES:
        for record_size in (1, 3, 65535):
            for feed_name in FEEDS:
                if len(case[2]) > 1000 and record_size < 100 and feed_name != "whole":
                    continue
                cases.append(
                    pytest.param(
                        *case, record_size, feed_name, id=f"{case[0]}-{record_size}-{feed_name}"
                    )
                )
    return cases


@pytest.mark.parametrize(
    ("name", "pairs", "wire", "record_size", "feed_name"), _through_params_cases()
)
def test_pairs_through_params_records(
    name: str, pairs: list[tuple[bytes, bytes]], wire: bytes, record_size: int, feed_name: str
) -> None:
    """The same block as PARAMS records of any size reaches the app as one dict."""
    feed = FEEDS[feed_name]
    wire_records = b"".join(
        f.encode_record(f.PARAMS, 1, wire[i : i + record_size])
        for i in range(0, len(wire), record_size)
    )
    conn = new_conn(max_params_size=len(wire))
    events = feed(conn, f.encode_begin_request(1) + wire_records + f.encode_record(f.PARAMS, 1))
    expected = {name.decode("latin-1"): value.decode("latin-1") for name, value in pairs}
    assert events == [f.RequestStarted(1, f.RESPONDER, True), f.Params(1, expected)]


def test_pairs_length_too_big_to_encode() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 0x80000000

    with pytest.raises(ValueError, match="2147483648"):
        f.encode_pairs([(Huge(), b"")])


# --------------------------------------------------------------------------- a request


def request_bytes(
    rid: int = 1,
    params: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    keep_conn: bool = True,
) -> bytes:
    if params is None:
        params = [(b"REQUEST_METHOD", b"POST"), (b"PATH_INFO", b"/caf\xe9")]
    return b"".join(
        [
            f.encode_begin_request(rid, keep_conn=keep_conn),
            f.encode_stream(f.PARAMS, rid, f.encode_pairs(params)) if params else b"",
            f.encode_record(f.PARAMS, rid),
            f.encode_stream(f.STDIN, rid, body) if body else b"",
            f.encode_record(f.STDIN, rid),
        ]
    )


def test_responder_request(feed: Feed) -> None:
    conn = new_conn()
    events = feed(conn, request_bytes(body=b"hello"))
    assert events == [
        f.RequestStarted(1, f.RESPONDER, True),
        f.Params(1, {"REQUEST_METHOD": "POST", "PATH_INFO": "/caf\xe9"}),
        f.StdinData(1, b"hello"),
        f.StdinEnd(1),
    ]
    assert conn.active == {1}
    assert conn.data_to_send() == b""


def test_responder_request_with_trailing_data(feed: Feed) -> None:
    """A request followed by the start of the next: the same events, nothing more yet."""
    conn = new_conn()
    following = f.encode_begin_request(2)
    events = feed(conn, request_bytes(body=b"hello") + following[:5])
    assert [type(e) for e in events] == [f.RequestStarted, f.Params, f.StdinData, f.StdinEnd]
    assert conn.receive_data(following[5:]) == [f.RequestStarted(2, f.RESPONDER, True)]


def test_stdin_in_many_records_and_big_body(feed: Feed) -> None:
    body = bytes(range(256)) * 700  # 179 200 bytes: three records
    conn = new_conn()
    events = feed(conn, request_bytes(body=body))
    data = [e for e in events if isinstance(e, f.StdinData)]
    assert [len(e.data) for e in data] == [65528, 65528, 179200 - 2 * 65528]
    assert b"".join(e.data for e in data) == body
    assert events[-1] == f.StdinEnd(1)


def test_last_repeated_param_wins() -> None:
    conn = new_conn()
    params = [(b"A", b"1"), (b"B", b"x"), (b"A", b"2")]
    events = conn.receive_data(request_bytes(params=params))
    assert events[1] == f.Params(1, {"A": "2", "B": "x"})


def test_no_params_at_all() -> None:
    events = new_conn().receive_data(request_bytes(params=[]))
    assert events[1] == f.Params(1, {})


def test_response_side() -> None:
    conn = new_conn()
    conn.receive_data(request_bytes())
    head = b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    out = conn.send_stdout(1, head) + conn.send_stdout(1, b"") + conn.end_request(1, 3)
    assert read_records(out) == [
        f.Record(f.STDOUT, 1, head),
        f.Record(f.STDOUT, 1, b""),
        f.Record(f.END_REQUEST, 1, b"\x00\x00\x00\x03\x00\x00\x00\x00"),
    ]
    assert conn.active == set()
    assert not conn.should_close


def test_end_request_closes_stderr_when_used() -> None:
    conn = new_conn()
    conn.receive_data(request_bytes())
    out = conn.send_stderr(1, b"warning\n") + conn.end_request(1)
    assert [(r.type, r.content) for r in read_records(out)] == [
        (f.STDERR, b"warning\n"),
        (f.STDOUT, b""),
        (f.STDERR, b""),
        (f.END_REQUEST, b"\0" * 8),
    ]


@pytest.mark.parametrize(
    ("status", "wire"), [(-1, b"\xff\xff\xff\xff"), (0x12345678, b"\x12\x34\x56\x78")]
)
def test_end_request_app_status(status: int, wire: bytes) -> None:
    assert f.encode_end_request(4, status, f.OVERLOADED) == (
        b"\x01\x03\x00\x04\x00\x08\x00\x00" + wire + b"\x02\0\0\0"
    )


def test_end_request_of_inactive_request_is_a_local_error() -> None:
    conn = new_conn()
    with pytest.raises(ValueError, match="request 1 is not active"):
        conn.end_request(1)
    conn.receive_data(request_bytes())
    conn.end_request(1)
    with pytest.raises(ValueError, match="request 1 is not active"):
        conn.end_request(1)


@pytest.mark.parametrize("size", [1, 7, 8, 65527, 65528, 65529, 65535, 65536, 131056, 200001])
def test_send_stdout_split_and_padded(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    out = new_conn().send_stdout(3, data)
    layout = records_of(out)
    for rtype, rid, clen, plen in layout:
        assert (rtype, rid) == (f.STDOUT, 3)
        assert 0 < clen <= 65535
        assert (clen + plen) % 8 == 0 and plen < 8
    assert sum(clen for _, _, clen, _ in layout) == size
    assert len(layout) == -(-size // 65528)
    assert b"".join(r.content for r in read_records(out)) == data


def test_encode_stream_empty_is_end_of_stream() -> None:
    assert f.encode_stream(f.STDOUT, 1, b"") == b"\x01\x06\x00\x01\x00\x00\x00\x00"


# --------------------------------------------------------------------------- keep-conn


def test_keep_conn_0_closes_after_end_request() -> None:
    conn = new_conn()
    conn.receive_data(request_bytes(keep_conn=False))
    assert not conn.should_close
    conn.end_request(1)
    assert conn.should_close


def test_keep_conn_1_serves_the_same_id_again(feed: Feed) -> None:
    """nginx reuses request id 1 for every request on a kept connection."""
    conn = new_conn()
    for body in (b"one", b"two", b"three"):
        events = feed(conn, request_bytes(body=body))
        assert events[0] == f.RequestStarted(1, f.RESPONDER, True)
        assert events[2] == f.StdinData(1, body)
        conn.end_request(1)
        assert not conn.should_close


# --------------------------------------------------------------------------- management


@pytest.mark.parametrize(
    ("asked", "answer"),
    [
        ([b"FCGI_MAX_CONNS"], [(b"FCGI_MAX_CONNS", b"10")]),
        (
            [b"FCGI_MPXS_CONNS", b"FCGI_MAX_REQS"],
            [(b"FCGI_MPXS_CONNS", b"1"), (b"FCGI_MAX_REQS", b"50")],
        ),
        (
            [b"FCGI_MAX_REQS", b"FCGI_MAX_CONNS", b"FCGI_MPXS_CONNS"],
            [(b"FCGI_MAX_REQS", b"50"), (b"FCGI_MAX_CONNS", b"10"), (b"FCGI_MPXS_CONNS", b"1")],
        ),
        ([b"FCGI_NOPE", b"FCGI_MAX_REQS", b"FCGI_MAX_REQS"], [(b"FCGI_MAX_REQS", b"50")]),
        ([b"SOMETHING_ELSE"], []),
        ([], []),
    ],
)
def test_get_values_answers_only_the_names_asked(
    asked: list[bytes], answer: list[tuple[bytes, bytes]], feed: Feed
) -> None:
    conn = new_conn()
    query = f.encode_record(f.GET_VALUES, 0, f.encode_pairs((name, b"") for name in asked))
    assert feed(conn, query) == []
    reply = read_records(conn.data_to_send())
    assert reply == [f.Record(f.GET_VALUES_RESULT, 0, f.encode_pairs(answer))]
    assert conn.data_to_send() == b""


def test_get_values_reflects_settings() -> None:
    conn = f.ServerConnection(max_conns=3, max_reqs=1, mpxs_conns=False)
    query = f.encode_record(
        f.GET_VALUES,
        0,
        f.encode_pairs(
            [(b"FCGI_MAX_CONNS", b""), (b"FCGI_MAX_REQS", b""), (b"FCGI_MPXS_CONNS", b"")]
        ),
    )
    conn.receive_data(query)
    (reply,) = read_records(conn.data_to_send())
    assert f.decode_pairs(reply.content) == [
        (b"FCGI_MAX_CONNS", b"3"),
        (b"FCGI_MAX_REQS", b"1"),
        (b"FCGI_MPXS_CONNS", b"0"),
    ]


def test_get_values_with_bad_pairs_is_an_error() -> None:
    with pytest.raises(RemoteProtocolError):
        new_conn().receive_data(f.encode_record(f.GET_VALUES, 0, b"\x05\x00ab"))


@pytest.mark.parametrize("rtype", [42, 255, f.BEGIN_REQUEST, f.STDIN, f.GET_VALUES_RESULT])
def test_unknown_management_type(rtype: int, feed: Feed) -> None:
    conn = new_conn()
    assert feed(conn, f.encode_record(rtype, 0, b"whatever")) == []
    assert conn.data_to_send() == f.encode_record(f.UNKNOWN_TYPE, 0, bytes([rtype]) + b"\0" * 7)


def test_management_replies_during_a_request() -> None:
    conn = new_conn()
    wire = request_bytes()
    mid = len(f.encode_begin_request(1))
    events = conn.receive_data(wire[:mid] + f.encode_record(99, 0) + wire[mid:])
    assert len(events) == 3
    assert read_records(conn.data_to_send()) == [f.Record(f.UNKNOWN_TYPE, 0, b"\x63" + b"\0" * 7)]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("role", [f.AUTHORIZER, f.FILTER, 0, 77])
def test_unknown_role_refused_by_the_core(role: int, feed: Feed) -> None:
    conn = new_conn()
    begin = f.encode_record(f.BEGIN_REQUEST, 4, struct.pack("!HB5x", role, f.KEEP_CONN))
    rest = b"".join(
        [
            f.encode_stream(f.PARAMS, 4, f.encode_pairs([(b"A", b"b")])),
            f.encode_record(f.PARAMS, 4),
            f.encode_record(f.STDIN, 4, b"body"),
            f.encode_record(f.DATA, 4, b"filter data"),
            f.encode_record(f.DATA, 4),
            f.encode_record(f.STDIN, 4),
            f.encode_record(f.ABORT_REQUEST, 4),
        ]
    )
    assert feed(conn, begin + rest) == []
    assert conn.data_to_send() == f.encode_end_request(4, 0, f.UNKNOWN_ROLE)
    assert conn.active == set()
    assert not conn.should_close
    # the connection still serves a responder after that
    assert feed(conn, request_bytes(rid=4))[0] == f.RequestStarted(4, f.RESPONDER, True)


def test_unknown_role_without_keep_conn_closes() -> None:
    conn = new_conn()
    conn.receive_data(f.encode_begin_request(2, role=f.AUTHORIZER, keep_conn=False))
    assert conn.data_to_send() == f.encode_end_request(2, 0, f.UNKNOWN_ROLE)
    assert conn.should_close


def test_cant_mpx_conn(feed: Feed) -> None:
    conn = new_conn(mpxs_conns=False)
    events = feed(conn, f.encode_begin_request(1) + request_bytes(rid=2, body=b"x"))
    assert events == [f.RequestStarted(1, f.RESPONDER, True)]
    assert conn.data_to_send() == f.encode_end_request(2, 0, f.CANT_MPX_CONN)
    assert conn.active == {1}
    conn.end_request(1)
    assert feed(conn, request_bytes(rid=2))[0] == f.RequestStarted(2, f.RESPONDER, True)


def test_overloaded_past_max_reqs() -> None:
    conn = new_conn(max_reqs=2)
    events = conn.receive_data(
        f.encode_begin_request(1) + f.encode_begin_request(2) + f.encode_begin_request(3)
    )
    assert [e.request_id for e in events] == [1, 2]
    assert conn.data_to_send() == f.encode_end_request(3, 0, f.OVERLOADED)
    assert conn.receive_data(f.encode_record(f.PARAMS, 3)) == []  # dropped
    assert conn.active == {1, 2}


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize("rtype", [f.PARAMS, f.STDIN, f.DATA, f.ABORT_REQUEST])
def test_records_after_end_request_are_dropped(rtype: int, feed: Feed) -> None:
    conn = new_conn()
    conn.receive_data(f.encode_begin_request(1) + f.encode_record(f.PARAMS, 1))
    conn.end_request(1)  # answered before the body came
    assert feed(conn, f.encode_record(rtype, 1, b"late") + f.encode_record(rtype, 1)) == []
    assert conn.active == set()


@pytest.mark.parametrize("rtype", [f.PARAMS, f.STDIN, f.DATA, f.ABORT_REQUEST])
def test_records_for_a_never_begun_id(rtype: int) -> None:
    conn = new_conn()
    conn.receive_data(f.encode_begin_request(1))
    with pytest.raises(RemoteProtocolError, match="request 2, which was never begun"):
        conn.receive_data(f.encode_record(rtype, 2, b"x"))
    # the connection is dead from then on
    with pytest.raises(RemoteProtocolError, match="never begun"):
        conn.receive_data(f.encode_record(f.GET_VALUES, 0))
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"")


def test_begin_twice_while_active() -> None:
    conn = new_conn()
    conn.receive_data(f.encode_begin_request(1))
    with pytest.raises(RemoteProtocolError, match="already active"):
        conn.receive_data(f.encode_begin_request(1))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (f.encode_record(f.BEGIN_REQUEST, 1, b"\x00\x01\x01"), "3 bytes of content, expected 8"),
        (f.encode_record(f.BEGIN_REQUEST, 1, b"\x00\x01" + b"\0" * 7), "9 bytes"),
        (f.encode_begin_request(1) + f.encode_record(f.STDIN, 1, b"x"), "before its PARAMS ended"),
        (f.encode_begin_request(1) + f.encode_record(f.STDIN, 1), "before its PARAMS ended"),
        (request_bytes() + f.encode_record(f.PARAMS, 1, b"\x01\x01ab"), "after the empty PARAMS"),
        (request_bytes() + f.encode_record(f.STDIN, 1, b"more"), "after its end"),
        (request_bytes() + f.encode_record(f.STDIN, 1), "after its end"),
        (
            f.encode_begin_request(1)
            + f.encode_record(f.PARAMS, 1, b"\x05\x05ab")
            + f.encode_record(f.PARAMS, 1),
            "only 2 bytes left",
        ),
        (
            f.encode_begin_request(1)
            + f.encode_record(f.PARAMS, 1, b"\x80\x00")
            + f.encode_record(f.PARAMS, 1),
            "cut short",
        ),
        (
            f.encode_begin_request(1) + f.encode_record(f.STDOUT, 1, b"x"),
            "STDOUT record for request 1",
        ),
        (f.encode_begin_request(1) + f.encode_record(f.STDERR, 1), "STDERR record"),
        (f.encode_begin_request(1) + f.encode_end_request(1), "END_REQUEST record"),
        (f.encode_begin_request(1) + f.encode_record(f.GET_VALUES, 1), "GET_VALUES record"),
        (f.encode_begin_request(1) + f.encode_record(42, 1), "type 42 record"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "version 71"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "version 22"),  # a TLS hello
    ],
)
def test_malformed(wire: bytes, message: str, feed: Feed) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        feed(new_conn(), wire)


def test_params_over_the_bound() -> None:
    block = f.encode_pairs([(b"NAME", b"v" * 991)])  # 1000 bytes
    assert len(block) == 1000
    # at the bound: fine, in one record or in several
    for size in (1000, 300, 1):
        conn = new_conn(max_params_size=1000)
        records = b"".join(
            f.encode_record(f.PARAMS, 1, block[i : i + size]) for i in range(0, 1000, size)
        )
        events = conn.receive_data(
            f.encode_begin_request(1) + records + f.encode_record(f.PARAMS, 1)
        )
        assert events[1] == f.Params(1, {"NAME": "v" * 991})
    # one byte over: refused as soon as the record that crosses it arrives
    for size in (1001, 300):
        conn = new_conn(max_params_size=999)
        conn.receive_data(f.encode_begin_request(1))
        records = [f.encode_record(f.PARAMS, 1, block[i : i + size]) for i in range(0, 1000, size)]
        for record in records[:-1]:
            assert conn.receive_data(record) == []
        with pytest.raises(RemoteProtocolError, match="over 999 bytes"):
            conn.receive_data(records[-1])


def test_params_bound_is_per_request() -> None:
    block = f.encode_pairs([(b"N", b"v" * 590)])  # 593 bytes; two would be over 1000
    conn = new_conn(max_params_size=1000)
    for rid in (1, 2):
        conn.receive_data(f.encode_begin_request(rid) + f.encode_record(f.PARAMS, rid, block))
    events = conn.receive_data(f.encode_record(f.PARAMS, 1) + f.encode_record(f.PARAMS, 2))
    assert [e.request_id for e in events] == [1, 2]


def test_peer_close() -> None:
    conn = new_conn()
    assert conn.receive_data(b"") == []
    conn = new_conn()
    conn.receive_data(request_bytes()[:-3])
    with pytest.raises(RemoteProtocolError, match="middle of a record"):
        conn.receive_data(b"")
    conn = new_conn()
    conn.receive_data(request_bytes())
    assert conn.receive_data(b"") == []
    with pytest.raises(RemoteProtocolError, match="after the peer closed"):
        conn.receive_data(f.encode_record(f.GET_VALUES, 0))


# --------------------------------------------------------------------------- multiplexing


def interleave(*streams: list[bytes]) -> bytes:
    """Round-robin the records of several requests."""
    out = []
    for i in range(max(len(s) for s in streams)):
        out.extend(s[i] for s in streams if i < len(s))
    return b"".join(out)


def request_records(rid: int, params: list[tuple[bytes, bytes]], body: bytes) -> list[bytes]:
    block = f.encode_pairs(params)
    records = [f.encode_begin_request(rid)]
    records += [f.encode_record(f.PARAMS, rid, block[i : i + 40]) for i in range(0, len(block), 40)]
    records.append(f.encode_record(f.PARAMS, rid))
    records += [f.encode_record(f.STDIN, rid, body[i : i + 100]) for i in range(0, len(body), 100)]
    records.append(f.encode_record(f.STDIN, rid))
    return records


def test_multiplexed_interleaved_requests(feed: Feed) -> None:
    conn = new_conn()
    specs = {
        1: ([(b"PATH_INFO", b"/slow"), (b"X", b"a" * 100)], b"1" * 450),
        2: ([(b"PATH_INFO", b"/fast")], b""),
        300: ([(b"PATH_INFO", b"/third"), (b"Y", b"b" * 70)], b"3" * 250),
    }
    events = feed(conn, interleave(*(request_records(rid, *spec) for rid, spec in specs.items())))
    for rid, (params, body) in specs.items():
        mine = [e for e in events if e.request_id == rid]
        assert mine[0] == f.RequestStarted(rid, f.RESPONDER, True)
        assert mine[1] == f.Params(rid, {k.decode(): v.decode() for k, v in params})
        assert b"".join(e.data for e in mine if isinstance(e, f.StdinData)) == body
        assert mine[-1] == f.StdinEnd(rid)
    # the events of different requests really were interleaved
    assert [e.request_id for e in events[:3]] == [1, 2, 300]
    params_1 = next(
        i for i, e in enumerate(events) if isinstance(e, f.Params) and e.request_id == 1
    )
    assert events.index(f.StdinEnd(2)) < params_1
    assert conn.active == {1, 2, 300}
    out = conn.end_request(2)
    assert read_records(out)[-1] == f.Record(f.END_REQUEST, 2, b"\0" * 8)
    assert conn.active == {1, 300}
    conn.end_request(300)
    conn.end_request(1)
    assert conn.active == set() and not conn.should_close


def test_abort_request(feed: Feed) -> None:
    conn = new_conn()
    wire = (
        f.encode_begin_request(1)
        + f.encode_record(f.PARAMS, 1)
        + f.encode_record(f.STDIN, 1, b"part")
    )
    abort = f.encode_record(f.ABORT_REQUEST, 1)
    events = feed(conn, wire + abort + f.encode_record(f.STDIN, 1, b"more") + abort)
    assert events == [
        f.RequestStarted(1, f.RESPONDER, True),
        f.Params(1, {}),
        f.StdinData(1, b"part"),
        f.Aborted(1),
    ]
    assert conn.active == {1}  # the driver ends it
    out = conn.end_request(1)
    assert read_records(out)[-1].type == f.END_REQUEST
    assert feed(conn, abort) == []


def test_abort_before_params_end() -> None:
    conn = new_conn()
    events = conn.receive_data(f.encode_begin_request(1) + f.encode_record(f.ABORT_REQUEST, 1))
    assert events == [f.RequestStarted(1, f.RESPONDER, True), f.Aborted(1)]
    assert conn.receive_data(f.encode_record(f.PARAMS, 1)) == []


# --------------------------------------------------------------------------- hypothesis


def check_events(events: object) -> None:
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, EVENT_TYPES)
        if isinstance(event, f.StdinData):
            assert event.data


VALID_STARTS = [
    b"",
    f.encode_begin_request(1),
    f.encode_begin_request(1) + f.encode_record(f.PARAMS, 1, b"\x01\x01ab"),
    request_bytes(body=b"x")[:-8],
]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(VALID_STARTS), st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_arbitrary_bytes(start: bytes, chunks: list[bytes]) -> None:
    """Arbitrary bytes, alone or after a valid start: events or a RemoteProtocolError,
    nothing else."""
    conn = new_conn(max_params_size=512)
    for chunk in [*(c for c in [start, *chunks] if c), b""]:
        try:
            check_events(conn.receive_data(chunk))
        except RemoteProtocolError:
            return
        assert conn._reader.pending < f.MAX_RECORD_LEN
        assert isinstance(conn.data_to_send(), bytes)


def record_strategy() -> st.SearchStrategy[bytes]:
    """Records of any type with plausible ids, some with broken contents."""
    return st.builds(
        lambda t, rid, content, pad: f.encode_record(t, rid, content, pad),
        st.sampled_from([*range(1, 12), 0, 12, 200]),
        st.sampled_from([0, 1, 2, 65535]),
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda r, fl: struct.pack("!HB5x", r, fl), st.integers(0, 4), st.integers(0, 3)
            ),
            st.builds(
                f.encode_pairs,
                st.lists(st.tuples(st.binary(max_size=130), st.binary(max_size=130)), max_size=3),
            ),
        ),
        st.one_of(st.none(), st.integers(0, 255)),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record_strategy(), max_size=20), st.data())
def test_fuzz_well_framed_records(records: list[bytes], data: st.DataObject) -> None:
    """Valid framing, arbitrary sequence: the state machine never raises anything else."""
    wire = b"".join(records)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    conn = new_conn(max_params_size=300, max_reqs=2)
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    for piece in [*(p for p in pieces if p), b""]:
        try:
            check_events(conn.receive_data(piece))
        except RemoteProtocolError:
            return
        for record in read_records(conn.data_to_send()):
            assert record.type in (f.GET_VALUES_RESULT, f.UNKNOWN_TYPE, f.END_REQUEST)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=300)), max_size=6))
def test_roundtrip_pairs(pairs: list[tuple[bytes, bytes]]) -> None:
    assert f.decode_pairs(f.encode_pairs(pairs)) == pairs


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 65535),
    st.binary(max_size=2000),
    st.one_of(st.none(), st.integers(0, 255)),
    st.binary(max_size=20),
)
def test_roundtrip_record(
    rtype: int, rid: int, content: bytes, padding: int | None, tail: bytes
) -> None:
    wire = f.encode_record(rtype, rid, content, padding)
    assert len(wire) % 8 == 0 or padding is not None
    reader = f.RecordReader()
    if tail[:1] not in (b"", b"\x01"):
        with pytest.raises(RemoteProtocolError):
            reader.feed(wire + tail)
        return
    assert reader.feed(wire + tail)[0] == f.Record(rtype, rid, content)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200_000), st.integers(1, 65535))
def test_roundtrip_stream(data: bytes, rid: int) -> None:
    wire = f.encode_stream(f.STDOUT, rid, data)
    records = read_records(wire)
    assert b"".join(r.content for r in records) == data
    assert all(len(r.content) <= 65535 and r.request_id == rid for r in records)
    assert len(wire) % 8 == 0


latin1_text = st.text(st.characters(max_codepoint=255), max_size=150)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.lists(st.tuples(latin1_text, latin1_text), max_size=5),
            st.binary(max_size=700),
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    ),
    st.data(),
)
def test_fuzz_structured_conversation(
    requests: list[tuple[list[tuple[str, str]], bytes, bool]], data: st.DataObject
) -> None:
    """Random requests, interleaved in a random order, cut at random points: every request
    arrives with its params (last repeat wins) and its body, in order."""
    queues = {}
    for rid, (params, body, _) in enumerate(requests, start=1):
        pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in params]
        queues[rid] = request_records(rid, pairs, body)
    order: list[bytes] = []
    while queues:
        rid = data.draw(st.sampled_from(sorted(queues)))
        order.append(queues[rid].pop(0))
        if not queues[rid]:
            del queues[rid]
    wire = b"".join(order)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    conn = new_conn()
    events: list[f.Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        if a < b:
            events += conn.receive_data(wire[a:b])
    for rid, (params, body, _) in enumerate(requests, start=1):
        mine = [e for e in events if e.request_id == rid]
        assert mine[0] == f.RequestStarted(rid, f.RESPONDER, True)
        assert mine[1] == f.Params(rid, dict(params))
        assert b"".join(e.data for e in mine[2:-1] if isinstance(e, f.StdinData)) == body
        assert mine[-1] == f.StdinEnd(rid)
    assert conn.active == set(range(1, len(requests) + 1))


# --------------------------------------------------------------------------- nginx captures
# Real bytes from nginx 1.22.1 (see tests/data/README.txt for the requests and the config).
# The expected values come from those requests and that config.

NGINX_NAMES = {
    "QUERY_STRING",
    "REQUEST_METHOD",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SCRIPT_NAME",
    "REQUEST_URI",
    "DOCUMENT_URI",
    "DOCUMENT_ROOT",
    "SERVER_PROTOCOL",
    "REQUEST_SCHEME",
    "GATEWAY_INTERFACE",
    "SERVER_SOFTWARE",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "REMOTE_USER",
    "SERVER_ADDR",
    "SERVER_PORT",
    "SERVER_NAME",
    "REDIRECT_STATUS",
    "HTTP_HOST",
    "PATH_INFO",
    "HTTP_USER_AGENT",
    "HTTP_ACCEPT",
}
NGINX_COMMON = {
    "SCRIPT_NAME": "",  # sent twice, "/fcgi/..." then "": the last one wins
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REQUEST_SCHEME": "http",
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SERVER_SOFTWARE": "nginx/1.22.1",
    "REMOTE_ADDR": "127.0.0.1",
    "REMOTE_USER": "",
    "SERVER_ADDR": "127.0.0.1",
    "SERVER_NAME": "localhost",
    "REDIRECT_STATUS": "200",
    "HTTP_HOST": "127.0.0.1",
    "HTTP_USER_AGENT": "curl/7.88.1",
    "HTTP_ACCEPT": "*/*",
}


def capture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def check_nginx_params(
    params: dict[str, str], extra_names: set[str], expected: dict[str, str]
) -> None:
    assert set(params) == NGINX_NAMES | extra_names
    for key, value in {**NGINX_COMMON, **expected}.items():
        assert params[key] == value, key
    assert params["REMOTE_PORT"].isdigit() and params["SERVER_PORT"].isdigit()


def split_events(events: list[f.Event]) -> tuple[list[f.Event], dict[str, str], bytes, list[int]]:
    params = [e for e in events if isinstance(e, f.Params)]
    stdin = [e for e in events if isinstance(e, f.StdinData)]
    assert len(params) == 1
    assert events[-1] == f.StdinEnd(1)
    return events, params[0].params, b"".join(e.data for e in stdin), [len(e.data) for e in stdin]


def test_nginx_get(feed: Feed) -> None:
    conn = new_conn()
    events, params, body, _ = split_events(feed(conn, capture("nginx_fcgi_get.bin")))
    assert events[0] == f.RequestStarted(1, f.RESPONDER, False)
    check_nginx_params(
        params,
        set(),
        {
            "REQUEST_METHOD": "GET",
            "QUERY_STRING": "x=1&name=caf%C3%A9",
            "REQUEST_URI": "/fcgi/get?x=1&name=caf%C3%A9",
            "DOCUMENT_URI": "/fcgi/get",
            "PATH_INFO": "/fcgi/get",
            "CONTENT_TYPE": "",  # nginx sends them empty on GET
            "CONTENT_LENGTH": "",
        },
    )
    assert body == b""
    conn.end_request(1)
    assert conn.should_close  # fastcgi_keep_conn off: KEEP_CONN=0


def test_nginx_post(feed: Feed) -> None:
    conn = new_conn()
    events, params, body, _ = split_events(feed(conn, capture("nginx_fcgi_post.bin")))
    assert events[0] == f.RequestStarted(1, f.RESPONDER, False)
    form = "application/x-www-form-urlencoded"
    check_nginx_params(
        params,
        {"HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"},
        {
            "REQUEST_METHOD": "POST",
            "QUERY_STRING": "",
            "REQUEST_URI": "/fcgi/post",
            "PATH_INFO": "/fcgi/post",
            "CONTENT_TYPE": form,
            "CONTENT_LENGTH": "20",
            "HTTP_CONTENT_TYPE": form,  # the copies the WSGI environ builder drops
            "HTTP_CONTENT_LENGTH": "20",
        },
    )
    assert body == b"name=chaussette&n=42"


def test_nginx_big_post(feed: Feed) -> None:
    conn = new_conn()
    _, params, body, sizes = split_events(feed(conn, capture("nginx_fcgi_post_big.bin")))
    assert params["CONTENT_LENGTH"] == "70000"
    assert params["CONTENT_TYPE"] == "application/octet-stream"
    assert body == b"0123456789abcdef" * 4375
    assert sizes == [32768, 32768, 70000 - 65536]  # nginx's 32 KiB STDIN records


def test_nginx_keep_conn(feed: Feed) -> None:
    """Two requests on one kept connection, both with request id 1."""
    wire = capture("nginx_fcgi_keepconn.bin")
    # the second request starts at the second BEGIN_REQUEST record
    offsets = []
    pos = 0
    for rtype, _, clen, plen in records_of(wire):
        if rtype == f.BEGIN_REQUEST:
            offsets.append(pos)
        pos += 8 + clen + plen
    assert len(offsets) == 2 and offsets[0] == 0
    conn = new_conn()
    first = feed(conn, wire[: offsets[1]])
    events, params, body, _ = split_events(first)
    assert events[0] == f.RequestStarted(1, f.RESPONDER, True)
    assert (params["REQUEST_METHOD"], params["QUERY_STRING"], params["PATH_INFO"]) == (
        "GET",
        "q=1",
        "/keep/first",
    )
    assert body == b""
    conn.end_request(1)
    assert not conn.should_close
    events, params, body, _ = split_events(feed(conn, wire[offsets[1] :]))
    assert events[0] == f.RequestStarted(1, f.RESPONDER, True)
    check_nginx_params(
        params,
        {"HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"},
        {
            "REQUEST_METHOD": "POST",
            "REQUEST_URI": "/keep/second",
            "PATH_INFO": "/keep/second",
            "CONTENT_TYPE": "text/plain",
            "CONTENT_LENGTH": "5",
        },
    )
    assert body == b"hello"
    conn.end_request(1)
    assert not conn.should_close
    assert conn.receive_data(b"") == []


def test_nginx_capture_with_trailing_data() -> None:
    conn = new_conn()
    events = conn.receive_data(capture("nginx_fcgi_post.bin") + f.encode_begin_request(1)[:6])
    assert events[-1] == f.StdinEnd(1)
    with pytest.raises(RemoteProtocolError, match="middle of a record"):
        conn.receive_data(b"")


def test_nginx_capture_over_params_bound() -> None:
    wire = capture("nginx_fcgi_get.bin")
    params_size = sum(clen for rtype, _, clen, _ in records_of(wire) if rtype == f.PARAMS)
    assert new_conn(max_params_size=params_size).receive_data(wire)[-1] == f.StdinEnd(1)
    with pytest.raises(RemoteProtocolError, match=f"over {params_size - 1} bytes"):
        new_conn(max_params_size=params_size - 1).receive_data(wire)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=60),
        st.builds(
            lambda pairs, tail: f.encode_pairs(pairs) + tail,
            st.lists(st.tuples(st.binary(max_size=140), st.binary(max_size=140)), max_size=3),
            st.binary(max_size=6),
        ),
    )
)
def test_params_fast_path_agrees_with_decode_pairs(block: bytes) -> None:
    """The dict the connection builds (its own fast loop) matches decode_pairs, and both
    refuse the same blocks."""
    conn = new_conn()
    wire = (
        f.encode_begin_request(1)
        + (f.encode_record(f.PARAMS, 1, block) if block else b"")
        + f.encode_record(f.PARAMS, 1)
    )
    try:
        pairs = f.decode_pairs(block)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            conn.receive_data(wire)
        return
    expected = {name.decode("latin-1"): value.decode("latin-1") for name, value in pairs}
    assert conn.receive_data(wire)[1] == f.Params(1, expected)
