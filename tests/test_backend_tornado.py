"""The tornado backend beyond the conformance suite (tests/test_http_backends.py): what the
adapter builds around tornado's HTTPServer (a streaming, bounded response path instead of
WSGIContainer's buffering, a drain, a chunked-body reader that takes extensions and
trailers, TCP_NODELAY kept on) and the settings it maps, against a real chaussette process.
Helpers and the checks shared with the waitress backend live in tests/test_backend_waitress.py.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.test_backend_waitress import (
    Conn,
    check_access_log,
    check_idle_connection_is_closed_after_the_timeout,
    check_inherited_socket_keeps_its_backlog,
    check_no_access_log_by_default,
    check_request_being_received_is_drained,
    check_sighup_restarts_in_place,
    check_stalled_upload_is_dropped,
    check_stuck_request_does_not_hold_the_exit,
    check_threads_bound_the_requests_served_at_once,
    chunked,
    environ_of,
    fetch,
    launch,
    request_bytes,
    sha,
)
from tests.test_wsgiref import _server_socket_for

BACKEND = "tornado"


def test_inherited_socket_keeps_its_backlog(procs) -> None:
    check_inherited_socket_keeps_its_backlog(procs, BACKEND)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_request_being_received_is_drained(procs, framing: str) -> None:
    if framing == "length":
        check_request_being_received_is_drained(procs, BACKEND)
        return
    # the same, with a chunked body: read by the adapter, not by tornado
    srv = launch(procs, BACKEND)
    data = b"q" * 200_000
    with Conn(srv.address) as idle, Conn(srv.address) as busy:
        idle.send(request_bytes("GET", "/", close=False))
        assert idle.response().body == b"hello"
        busy.send(
            request_bytes(
                "POST", "/echo", "Transfer-Encoding: chunked", "Expect: 100-continue", close=False
            )
        )
        assert busy.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        srv.proc.send(signal.SIGTERM)
        assert idle.closed_by_server()  # the drain has begun
        busy.send(chunked([data[:1000], data[1000:]]))
        resp = busy.response()
        assert resp.body.decode() == f"{len(data)} {sha(data)}"
        assert (resp.header("Connection") or "").lower() == "close"
        assert busy.closed_by_server()
    assert srv.proc.wait(15) == 0, srv.log()


def test_stuck_request_does_not_hold_the_exit(procs, tmp_path: Path) -> None:
    check_stuck_request_does_not_hold_the_exit(procs, BACKEND, tmp_path)


def test_sighup_restarts_in_place(procs, tmp_path: Path) -> None:
    check_sighup_restarts_in_place(procs, BACKEND, tmp_path)


def test_threads_bound_the_requests_served_at_once(procs, tmp_path: Path) -> None:
    check_threads_bound_the_requests_served_at_once(procs, BACKEND, tmp_path)


def test_idle_connection_is_closed_after_the_timeout(procs) -> None:
    check_idle_connection_is_closed_after_the_timeout(procs, BACKEND)


@pytest.mark.parametrize("chunked_body", [False, True], ids=["length", "chunked"])
def test_stalled_upload_is_dropped(procs, chunked_body: bool) -> None:
    check_stalled_upload_is_dropped(procs, BACKEND, chunked_body)


def test_access_log(procs, tmp_path: Path) -> None:
    check_access_log(procs, BACKEND, tmp_path)


def test_no_access_log_by_default(procs) -> None:
    check_no_access_log_by_default(procs, BACKEND)


def test_stalled_reader_is_dropped_after_the_timeout(procs, tmp_path: Path) -> None:
    """A client that stops reading holds one thread, until --timeout passes without progress:
    then its connection is closed and the app's iterable closed."""
    srv = launch(procs, BACKEND, "--timeout", "1", "--threads", "2")
    marker = tmp_path / "closed"
    with Conn(srv.address, rcvbuf=65536, timeout=15) as stalled:
        stalled.send(request_bytes("GET", f"/closed?marker={marker}&n=2000&pause=0"))
        stalled.read_until(b"\r\n\r\n")
        assert fetch(srv.address, "GET", "/").body == b"hello"  # served meanwhile
        deadline = time.monotonic() + 15
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), srv.log()
        assert stalled.received < 20 * 65536  # it was stalled: most of 125 MiB never sent
        stalled.read_to_eof()  # and its connection is closed
    assert "the client read nothing for 1 s" in srv.log()
    assert fetch(srv.address, "GET", "/").body == b"hello"


def test_tcp_nodelay_stays_on_between_requests(procs, tmp_path: Path) -> None:
    # tornado turns Nagle back on after each response of a keep-alive connection
    srv = launch(procs, BACKEND)
    with Conn(srv.address) as conn:
        for _ in range(2):
            conn.send(request_bytes("GET", "/", close=False))
            assert conn.response().body == b"hello"
        conn.send(request_bytes("GET", f"/gate?dir={tmp_path}&name=go"))
        conn.read_until(b"open\n")
        server_end = _server_socket_for(srv.proc.pid, conn.sock)
        assert server_end is not None
        with server_end:
            assert server_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        (tmp_path / "go").touch()
        conn.read_to_eof()


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        (["Transfer-Encoding: chunked", "Content-Length: 5"], b"5\r\nhello\r\n0\r\n\r\n", 400),
        (["Transfer-Encoding: gzip"], b"", 501),
        (["Transfer-Encoding: chunked"], b"zz\r\nhello\r\n0\r\n\r\n", 400),
        (["Transfer-Encoding: chunked"], b"5\r\nhelloXX0\r\n\r\n", 400),
    ],
    ids=["length-and-chunked", "unknown-coding", "bad-size", "no-crlf-after-chunk"],
)
def test_bad_body_framing_is_refused(procs, headers: list[str], body: bytes, status: int) -> None:
    srv = launch(procs, BACKEND)
    raw = request_bytes("POST", "/echo", *headers, close=False) + body
    with Conn(srv.address) as conn:
        conn.send(raw)
        resp = conn.response()
        assert resp.status == status, resp.raw[:300]
        assert conn.closed_by_server()
    assert fetch(srv.address, "GET", "/").body == b"hello"
    assert "Traceback" not in srv.log()


def test_chunked_body_environ(procs) -> None:
    srv = launch(procs, BACKEND)
    with Conn(srv.address) as conn:
        conn.send(
            request_bytes("POST", "/env/x", "Transfer-Encoding: chunked")
            + chunked([b"abc", b"defg"], trailer=b"X-Sum: 7\r\n")
        )
        resp = conn.response()
    assert resp.status == 200
    env = json.loads(resp.body)
    assert env["CONTENT_LENGTH"] == "7"  # de-chunked: a length every framework reads
    assert "HTTP_TRANSFER_ENCODING" not in env


def test_request_line_limit(procs) -> None:
    srv = launch(procs, BACKEND, "--limit-request-line", "100")
    assert fetch(srv.address, "GET", "/" + "x" * 200).status == 414
    assert fetch(srv.address, "GET", "/" + "x" * 50).status == 404


def test_oversized_head_closes_the_connection(procs) -> None:
    # tornado's way: no 431, the connection is closed
    srv = launch(procs, BACKEND, "--limit-request-headers", "2000")
    many = [f"X-Filler-{i}: {'v' * 40}" for i in range(60)]
    with Conn(srv.address) as conn:
        conn.send(request_bytes("GET", "/", *many))
        assert conn.read_to_eof() == b""
    assert fetch(srv.address, "GET", "/").body == b"hello"


def test_http10_streamed_response_ends_with_the_connection(procs) -> None:
    srv = launch(procs, BACKEND)
    with Conn(srv.address) as conn:
        conn.send(b"GET /stream?n=2&pause=0 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        raw = conn.read_to_eof()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == b"chunk 0\nchunk 1\n"
    assert b"keep-alive" not in head.lower()


def test_environ(procs, short_tmp: Path) -> None:
    srv = launch(procs, BACKEND)
    env = environ_of(srv.address, "X-A: 1", "X-A: 2", "Cookie: a=1", "Cookie: b=2")
    assert env["HTTP_X_A"] == "1, 2"  # tornado's own container joins with ","
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert env["SERVER_PORT"] == str(srv.address[1])
    unix = launch(procs, BACKEND, unix=short_tmp / "t.sock")
    env = environ_of(unix.address)
    assert (env["REMOTE_ADDR"], env["SERVER_PORT"]) == (str(short_tmp / "t.sock"), "")
