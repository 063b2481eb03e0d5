"""Unit tests of chaussette.wsgi, the WSGI host our own servers share.

``Response`` is the thing under test; the sink (the wire) is the edge, replaced by a small
recorder. ``BodyReader`` is checked against ``io.BytesIO`` as the oracle, over a source that
hands its bytes whole, a few at a time, or one byte at a time.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.util import FileWrapper

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaussette.wsgi import (
    ERROR_BODY,
    BodyReader,
    BodyTruncated,
    ErrorStream,
    Response,
    check_headers,
    check_status,
)

# -- the edge: a sink that records what the host asks of it --


class RecordingSink:
    def __init__(self, fail_on: str | None = None, sendfile: bool = True) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.fail_on = fail_on  # this call raises BrokenPipeError, as a vanished client does
        self.sendfile = sendfile

    def _record(self, *event: Any) -> None:
        if event[0] == self.fail_on:
            raise BrokenPipeError(32, "Broken pipe")
        self.events.append(event)

    def send_headers(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self._record("headers", status, list(headers), body)

    def send_body(self, data: bytes) -> None:
        assert data, "the host must never send an empty body piece"
        self._record("body", data)

    def send_file(self, file: Any, count: int | None) -> int | None:
        if not self.sendfile:
            return None
        data = file.read() if count is None else file.read(count)
        self._record("file", data, count)
        return len(data)

    def finish(self) -> None:
        self._record("finish")

    def abort(self) -> None:
        self._record("abort")

    @property
    def names(self) -> list[str]:
        return [event[0] for event in self.events]

    @property
    def status(self) -> str:
        return next(e[1] for e in self.events if e[0] == "headers")

    @property
    def headers(self) -> list[tuple[str, str]]:
        return next(e[2] for e in self.events if e[0] == "headers")

    @property
    def body(self) -> bytes:
        parts = {"headers": 3, "body": 1, "file": 1}
        return b"".join(e[parts[e[0]]] for e in self.events if e[0] in parts)


class Body:
    """An app iterable that records how far it was iterated and whether it was closed."""

    def __init__(self, *pieces: Any, fail_at: int | None = None) -> None:
        self.pieces = pieces
        self.fail_at = fail_at
        self.pulled = 0
        self.closed = 0

    def __iter__(self) -> Iterator[Any]:
        for i, piece in enumerate(self.pieces):
            if i == self.fail_at:
                raise RuntimeError("boom in the body")
            self.pulled += 1
            yield piece
        if self.fail_at == len(self.pieces):
            raise RuntimeError("boom in the body")

    def close(self) -> None:
        self.closed += 1


def environ(method: str = "GET") -> dict[str, Any]:
    return {"REQUEST_METHOD": method, "PATH_INFO": "/t"}


def run(
    app: Callable[..., Any], sink: RecordingSink | None = None, method: str = "GET"
) -> tuple[Response, RecordingSink]:
    sink = sink or RecordingSink()
    response = Response(app, environ(method), sink)
    response.run()
    return response, sink


def replying(status: str, headers: list[tuple[str, str]], result: Any) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response(status, headers)
        return result

    return app


CT = ("Content-Type", "text/plain")


# -- start_response is strict --


@pytest.mark.parametrize("status", ["200 OK", "404 Not Found", "599 Some Reason", "200 Ökay"])
def test_good_status(status: str) -> None:
    assert check_status(status) == int(status[:3])


@pytest.mark.parametrize(
    "status",
    [
        200,
        b"200 OK",
        "200",
        "200 ",
        "200OK",
        "20 OK",
        "2000 OK",
        "abc OK",
        "099 Low",
        "\uff12\uff10\uff10 OK",  # fullwidth digits: str.isdigit() says yes
        "200 OK\r\nX-Injected: 1",
        "200 OK\n",
        "200 O\0K",
        "200 \u2603",  # not latin-1
    ],
)
def test_bad_status_is_refused(status: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        check_status(status)
    response = Response(replying("200 OK", [], []), environ(), RecordingSink())
    with pytest.raises((TypeError, ValueError)):
        response.start_response(status, [CT])
    assert response.status is None  # nothing was taken from the failed call


@pytest.mark.parametrize(
    "headers",
    [
        ((("A", "b"),)),  # a tuple, not a list
        [["A", "b"]],  # a list, not a tuple
        [("A", "b", "c")],
        [(b"A", "b")],
        [("A", b"b")],
        [("A", 1)],
        [("A", "\u2603")],
        [("", "x")],
        [("A B", "x")],
        [("A:B", "x")],
        [("A\r\nB", "x")],
        [("X", "a\r\nSet-Cookie: evil=1")],
        [("X", "a\nb")],
        [("X", "a\rb")],
        [("X", "a\0b")],
        [("Connection", "close")],
        [("keep-alive", "timeout=5")],
        [("Transfer-Encoding", "chunked")],
        [("TE", "trailers")],
        [("Trailer", "X")],
        [("Upgrade", "websocket")],
        [("Proxy-Authenticate", "Basic")],
        [("PROXY-AUTHORIZATION", "x")],
        [("Content-Length", "abc")],
        [("Content-Length", "-1")],
        [("Content-Length", "1.0")],
        [("Content-Length", "\uff11")],
        [("Content-Length", "\xb2")],  # latin-1 superscript two: str.isdigit() says yes
        [("Content-Length", "1"), ("content-length", "2")],
    ],
)
def test_bad_headers_are_refused(headers: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        check_headers(headers)
    response = Response(replying("200 OK", [], []), environ(), RecordingSink())
    with pytest.raises((TypeError, ValueError)):
        response.start_response("200 OK", headers)


def test_good_headers_are_accepted_and_copied() -> None:
    headers = [CT, ("X-Tab", "a\tb"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    checked = check_headers(headers)
    assert checked == headers and checked is not headers


def test_header_injection_through_a_bad_app_gives_500_and_nothing_injected() -> None:
    _, sink = run(replying("200 OK", [("X", "1\r\nSet-Cookie: evil=1")], [b"body"]))
    assert sink.status == "500 Internal Server Error"
    assert all("evil" not in value for _, value in sink.headers)
    assert sink.body == ERROR_BODY


def test_second_call_without_exc_info_is_an_error() -> None:
    response = Response(replying("200 OK", [], []), environ(), RecordingSink())
    response.start_response("200 OK", [CT])
    with pytest.raises(AssertionError, match="second time"):
        response.start_response("500 Oops", [CT])


def test_second_call_with_exc_info_before_headers_replaces_the_response() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [CT])
        try:
            raise ValueError("handled by the app")
        except ValueError:
            start_response("503 Busy", [CT], sys.exc_info())
        return [b"try later"]

    response, sink = run(app)
    assert sink.status == "503 Busy"
    assert sink.body == b"try later"
    assert sink.names == ["headers", "finish"]
    assert not response.failed


def test_second_call_with_exc_info_after_headers_reraises() -> None:
    caught: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [CT])
        yield b"first"
        try:
            raise ValueError("too late")
        except ValueError as exc:
            try:
                start_response("500 Oops", [CT], sys.exc_info())
            except ValueError as again:
                caught.append(again)
                assert again is exc
                raise

    response, sink = run(app)
    assert len(caught) == 1
    assert sink.names == ["headers", "abort"]
    assert response.failed


# -- bodies, lengths, close() --


@pytest.mark.parametrize("container", [list, tuple])
def test_content_length_is_computed_for_lists(container: type) -> None:
    headers = [CT]
    response, sink = run(replying("200 OK", headers, container([b"ab", b"", b"cd"])))
    assert sink.events == [
        ("headers", "200 OK", [CT, ("Content-Length", "4")], b"abcd"),
        ("finish",),
    ]
    assert headers == [CT]  # the app's own list is left alone
    assert response.body_bytes == 4


def test_content_length_of_an_empty_list_is_zero() -> None:
    _, sink = run(replying("204 No Content", [], []))
    assert sink.events == [
        ("headers", "204 No Content", [("Content-Length", "0")], b""),
        ("finish",),
    ]


def test_the_apps_content_length_is_kept() -> None:
    _, sink = run(replying("200 OK", [CT, ("content-length", "4")], [b"ab", b"cd"]))
    assert [n for n, _ in sink.headers].count("content-length") == 1
    assert "Content-Length" not in [n for n, _ in sink.headers]
    assert sink.body == b"abcd"
    assert sink.names[-1] == "finish"


def test_a_generator_streams_without_a_computed_length() -> None:
    body = Body(b"", b"one", b"", b"two")
    _, sink = run(replying("200 OK", [CT], body))
    # headers wait for the first non-empty piece; empty pieces are not sent
    assert sink.events == [("headers", "200 OK", [CT], b"one"), ("body", b"two"), ("finish",)]
    assert body.closed == 1


def test_nothing_past_the_apps_content_length() -> None:
    body = Body(b"12345", b"67890", b"more")
    response, sink = run(replying("200 OK", [CT, ("Content-Length", "7")], body))
    assert sink.body == b"1234567"
    assert sink.names[-1] == "finish"
    assert body.pulled == 2  # iteration stopped once the length was reached
    assert body.closed == 1
    assert response.body_bytes == 7


def test_fewer_bytes_than_content_length_cut_the_response(caplog: Any) -> None:
    _, sink = run(replying("200 OK", [CT, ("Content-Length", "10")], Body(b"12345")))
    assert sink.names == ["headers", "abort"]
    assert "declared Content-Length 10 but sent 5" in caplog.text


@pytest.mark.parametrize(("method", "status"), [("HEAD", "200 OK"), ("GET", "304 Not Modified")])
def test_bodyless_responses_keep_their_content_length(method: str, status: str) -> None:
    _, sink = run(replying(status, [CT, ("Content-Length", "10")], Body()), method=method)
    assert sink.names == ["headers", "finish"]
    assert ("Content-Length", "10") in sink.headers


def test_the_legacy_write_callable() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        write = start_response("200 OK", [CT])
        write(b"a")
        write(b"b")
        return [b"c"]

    _, sink = run(app)
    assert sink.events == [
        ("headers", "200 OK", [CT], b"a"),
        ("body", b"b"),
        ("body", b"c"),
        ("finish",),
    ]


@pytest.mark.parametrize(
    ("case", "make_body", "sink_fails_on", "last_event"),
    [
        ("complete", lambda: Body(b"a", b"b"), None, "finish"),
        ("raises before any byte", lambda: Body(b"a", fail_at=0), None, "finish"),  # the 500
        ("raises mid-stream", lambda: Body(b"a", b"b", fail_at=1), None, "abort"),
        ("raises at the end", lambda: Body(b"a", fail_at=1), None, "abort"),
        ("yields a str", lambda: Body(b"a", "text"), None, "abort"),
        ("client gone on headers", lambda: Body(b"a", b"b"), "headers", None),
        ("client gone on body", lambda: Body(b"a", b"b"), "body", "headers"),
        ("client gone on finish", lambda: Body(b"a", b"b"), "finish", "body"),
    ],
)
def test_close_is_always_called(
    case: str, make_body: Callable[[], Body], sink_fails_on: str | None, last_event: str | None
) -> None:
    body = make_body()
    _, sink = run(replying("200 OK", [CT], body), RecordingSink(fail_on=sink_fails_on))
    assert body.closed == 1, case
    assert (sink.names[-1] if sink.names else None) == last_event, (case, sink.events)


def test_close_raising_is_logged_and_contained(caplog: Any) -> None:
    class BadClose(Body):
        def close(self) -> None:
            raise OSError("close failed")

    _, sink = run(replying("200 OK", [CT], BadClose(b"a")))
    assert sink.names == ["headers", "finish"]
    assert "close() raised" in caplog.text


# -- failures --


def test_app_raising_before_start_response_gives_500(caplog: Any) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        raise RuntimeError("boom")

    response, sink = run(app)
    assert sink.events == [
        (
            "headers",
            "500 Internal Server Error",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(ERROR_BODY))),
            ],
            ERROR_BODY,
        ),
        ("finish",),
    ]
    assert response.failed and response.status_code == 500
    record = next(r for r in caplog.records if "answered 500" in r.getMessage())
    assert record.levelno == logging.ERROR
    assert record.exc_info and record.exc_info[0] is RuntimeError


@pytest.mark.parametrize(
    "app",
    [
        lambda environ, start_response: [b"no start_response"],
        lambda environ, start_response: [],
        lambda environ, start_response: Body(),
        replying("200 OK", [CT], ["a str, not bytes"]),
        replying("200 OK", [CT], Body(b"", "a str after an empty piece")),
        replying("200 OK", [CT], Body(b"", fail_at=1)),  # nothing sent yet: still a 500
    ],
)
def test_failures_before_any_byte_give_500(app: Callable[..., Any]) -> None:
    response, sink = run(app)
    assert sink.status == "500 Internal Server Error"
    assert sink.body == ERROR_BODY
    assert sink.names == ["headers", "finish"]
    assert response.failed


def test_app_raising_after_headers_aborts(caplog: Any) -> None:
    body = Body(b"first", b"second", fail_at=1)
    response, sink = run(replying("200 OK", [CT], body))
    assert sink.events == [("headers", "200 OK", [CT], b"first"), ("abort",)]
    assert response.failed and not response.client_gone
    assert "connection cut" in caplog.text
    assert body.closed == 1


def test_a_vanished_client_ends_the_request_quietly(caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    body = Body(b"a", b"b", b"c")
    response, sink = run(replying("200 OK", [CT], body), RecordingSink(fail_on="body"))
    assert sink.names == ["headers"]  # no abort, no finish: there is nobody to tell
    assert response.client_gone and not response.failed
    assert body.pulled == 2
    assert "client went away" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_body_truncated_from_the_input_ends_the_request_quietly(caplog: Any) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(10)
        return [b"unreachable"]

    def cut(n: int) -> bytes:
        raise BodyTruncated("client closed with 10 body bytes unsent")

    env = environ("POST")
    env["wsgi.input"] = BodyReader(cut)
    sink = RecordingSink()
    response = Response(app, env, sink)
    response.run()
    assert sink.events == []
    assert response.client_gone and not response.failed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- wsgi.file_wrapper --


def temp_file(data: bytes) -> Any:
    f = tempfile.TemporaryFile()  # noqa: SIM115 (closed through the FileWrapper)
    f.write(data)
    f.seek(0)
    return f


def test_file_wrapper_goes_to_the_sink_as_a_file() -> None:
    f = temp_file(b"0123456789")
    f.seek(3)
    _, sink = run(replying("200 OK", [CT, ("Content-Length", "5")], FileWrapper(f, 4)))
    assert sink.events == [
        ("headers", "200 OK", [CT, ("Content-Length", "5")], b""),
        ("file", b"34567", 5),  # from the file's position, no more than Content-Length
        ("finish",),
    ]
    assert f.closed  # FileWrapper.close() closes the file


def test_file_wrapper_without_a_length_sends_the_whole_rest() -> None:
    f = temp_file(b"0123456789")
    _, sink = run(replying("200 OK", [CT], FileWrapper(f, 4)))
    assert ("file", b"0123456789", None) in sink.events
    assert f.closed


def test_file_wrapper_falls_back_to_iterating() -> None:
    f = temp_file(b"0123456789")
    _, sink = run(replying("200 OK", [CT], FileWrapper(f, 4)), RecordingSink(sendfile=False))
    assert sink.names == ["headers", "body", "body", "body", "finish"]  # blocks of 4
    assert sink.body == b"0123456789"
    assert f.closed


def test_file_wrapper_over_an_object_without_fileno() -> None:
    buf = io.BytesIO(b"0123456789")
    _, sink = run(replying("200 OK", [CT], FileWrapper(buf, 3)))
    assert "file" not in sink.names
    assert sink.body == b"0123456789"
    assert buf.closed


def test_file_wrapper_with_nothing_left_to_send() -> None:
    f = temp_file(b"0123456789")
    _, sink = run(replying("200 OK", [CT, ("Content-Length", "0")], FileWrapper(f)))
    assert sink.names == ["headers", "finish"]  # send_file(count=0) would mean "to the end"


# -- wsgi.errors --


def test_error_stream_logs_whole_lines(caplog: Any) -> None:
    stream = ErrorStream()
    assert stream.write("first\nsecond part") == len("first\nsecond part")
    assert [r.getMessage() for r in caplog.records] == ["first"]
    stream.writelines([" continued\n", "third\n"])
    stream.write("unfinished")
    stream.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "first",
        "second part continued",
        "third",
        "unfinished",
    ]
    assert {r.name for r in caplog.records} == {"chaussette.app"}


# -- wsgi.input --


class Source:
    """``read_some`` over bytes, at most ``step`` bytes per call; strict about its contract."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0
        self.ended = False
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        assert n > 0, "asked for nothing"
        assert not self.ended, "read again after the end of the body"
        self.calls += 1
        piece = self.data[self.pos : self.pos + min(n, self.step)]
        self.pos += len(piece)
        self.ended = not piece
        return piece


Op = tuple[str, Any]


def apply(target: Any, op: Op) -> Any:
    name, arg = op
    if name == "iter":
        return list(target)
    if arg == "none":
        return getattr(target, name)()
    return getattr(target, name)(arg)


STEPS = [1, 7, 1 << 30]  # one byte at a time, a few, whole

DATA = {
    "empty": b"",
    "one line": b"no newline",
    "lines": b"a\nbb\n\nccc\n",
    "blank lines": b"\n\n\n",
    "crlf": b"GET\r\nHost: x\r\n\r\n",
    "long lines": b"x" * 20000 + b"\n" + b"y" * 9000 + b"\nz",
    "binary": bytes(range(256)) * 40,
}

OPS: dict[str, list[Op]] = {
    "read all": [("read", "none")],
    "read -1": [("read", -1), ("read", -1)],
    "read None": [("read", None)],
    "read sizes": [("read", 0), ("read", 1), ("read", 3), ("read", 100), ("read", 100000)],
    "readline": [("readline", "none")] * 6,
    "readline sizes": [("readline", 2), ("readline", 0), ("readline", 5), ("readline", -1)] * 3,
    "readlines": [("readlines", "none")],
    "readlines hint": [("readlines", 3), ("readlines", 1), ("readlines", 0)],
    "iter": [("iter", None)],
    "mixed": [("read", 2), ("readline", "none"), ("readline", 3), ("read", 5), ("iter", None)],
}


@pytest.mark.parametrize("step", STEPS, ids=["bytewise", "step7", "whole"])
@pytest.mark.parametrize("data_name", list(DATA))
@pytest.mark.parametrize("ops_name", list(OPS))
def test_body_reader_matches_bytesio(step: int, data_name: str, ops_name: str) -> None:
    data = DATA[data_name]
    reader, oracle = BodyReader(Source(data, step)), io.BytesIO(data)
    for op in OPS[ops_name]:
        assert apply(reader, op) == apply(oracle, op), op
    assert reader.read() == oracle.read()
    assert reader.read(10) == b"" and reader.readline() == b""  # and again, past the end


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=400) | st.text("ab\n\r", max_size=400).map(str.encode),
    step=st.integers(1, 50),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["read", "readline", "readlines"]),
            st.one_of(st.just("none"), st.none(), st.integers(-2, 60)),
        )
        | st.just(("iter", None)),
        max_size=12,
    ),
)
def test_body_reader_matches_bytesio_on_anything(data: bytes, step: int, ops: list[Op]) -> None:
    reader, oracle = BodyReader(Source(data, step)), io.BytesIO(data)
    for op in ops:
        assert apply(reader, op) == apply(oracle, op), op
    assert reader.read() == oracle.read()


def test_body_reader_streams_what_it_has() -> None:
    source = Source(b"x" * 100_000, 1 << 30)
    reader = BodyReader(source)
    assert reader.read(10) == b"x" * 10
    assert source.calls == 1  # asked once for what fills the request, not for the whole body


def test_before_first_read_runs_once_before_the_source() -> None:
    order: list[str] = []
    source = Source(b"abc\ndef", 2)

    def read_some(n: int) -> bytes:
        order.append("read")
        return source(n)

    reader = BodyReader(read_some, lambda: order.append("100-continue"))
    assert order == []  # not at construction: only when the app reads
    assert reader.readline() == b"abc\n"
    assert reader.read() == b"def"
    assert order[0] == "100-continue" and order.count("100-continue") == 1
    assert order[1:] == ["read"] * (len(order) - 1)


def test_body_truncated_reaches_the_reader() -> None:
    def read_some(n: int) -> bytes:
        raise BodyTruncated("client closed with 5 body bytes unsent")

    with pytest.raises(BodyTruncated):
        BodyReader(read_some).read(5)


def test_a_long_line_is_read_whole() -> None:
    line = b"z" * (3 << 20) + b"\n"
    reader = BodyReader(Source(line + b"tail", 8192))
    assert reader.readline() == line
    assert reader.readline() == b"tail"
