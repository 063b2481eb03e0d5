"""chaussette's own SCGI server on its three engines, spoken to by a real client.

Real ``chaussette --protocol scgi --backend ENGINE`` processes, real sockets, the request
built with the core's ``encode_request``. The app is tests/apps/gateway_app.py (routes.py
inside ``wsgiref.validate.validator``). nginx's ``scgi_pass`` is tested in
test_scgi_nginx.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from chaussette.protocols import scgi
from tests.apps.gateway_app import FIRST, SECOND
from tests.conftest import Proc, chaussette_cmd, connect, free_port, poll_until, read_until_closed
from tests.fcgi_client import params_for, parse_cgi, scgi_request

ENGINES = ["threads", "gevent", "eventlet"]
APP = "tests.apps.gateway_app:application"
LOCAL = "127.0.0.1"


def wait_scgi(address: tuple[str, int] | str, proc: Proc, timeout: float = 20) -> None:
    """Poll until a request succeeds (a connect alone proves nothing)."""
    poll_until(
        lambda: scgi_request(address, "/").startswith(b"Status: "),
        f"SCGI answer from {address}",
        proc,
        timeout,
    )


def start(procs, engine: str, *args: str, app: str = APP) -> tuple[Proc, tuple[str, int]]:
    port = free_port()
    proc = procs.chaussette(
        "--protocol", "scgi", "--backend", engine, "--port", str(port), *args, app
    )
    wait_scgi((LOCAL, port), proc)
    return proc, (LOCAL, port)


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tmp_path_factory) -> Iterator[tuple[Proc, tuple[str, int]]]:
    port = free_port()
    proc = Proc(
        chaussette_cmd("--protocol", "scgi", "--backend", request.param, "--port", str(port), APP),
        log_dir=tmp_path_factory.mktemp("scgi"),
    )
    try:
        wait_scgi((LOCAL, port), proc)
        yield proc, (LOCAL, port)
    finally:
        proc.stop()
    assert "WSGIWarning" not in proc.output()


def ok(raw: bytes) -> bytes:
    status, _, body = parse_cgi(raw)
    assert status == 200, raw[:300]
    return body


def request_bytes(path: str, method: str = "GET", body: bytes = b"", **extra: str) -> bytes:
    params = params_for(path, method, body, **extra)
    params.pop("CONTENT_LENGTH", None)
    headers = [(b"CONTENT_LENGTH", b"%d" % len(body)), (b"SCGI", b"1")]
    headers += [(k.encode(), v.encode()) for k, v in params.items()]
    return scgi.encode_request(headers, body)


def test_get_and_environ(server):
    _, address = server
    environ = json.loads(ok(scgi_request(address, "/p/q?dump=1&a=b")))
    assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/p/q", "dump=1&a=b")
    assert environ["CONTENT_LENGTH"] == "0" and environ["SCGI"] == "1"
    assert environ["wsgi.url_scheme"] == "http"


def test_small_response_is_one_write(server):
    _, address = server
    with connect(address) as sock:
        sock.sendall(request_bytes("/"))
        first = sock.recv(65536)  # the whole response, then the close
        assert first.endswith(b"\r\n\r\nhello")
        assert read_until_closed(sock) == b""


def test_post_5mb_read_in_chunks(server):
    _, address = server
    body = os.urandom(5 * 1024 * 1024)
    answer = ok(scgi_request(address, "/echo?chunk=10000", "POST", body))
    assert answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def test_app_starts_before_the_body_is_complete(server):
    _, address = server
    data = request_bytes("/lines", "POST", b"one\ntwo\nthr\n")
    with connect(address) as sock:
        sock.sendall(data[:-4])
        time.sleep(0.2)
        sock.sendall(data[-4:])
        assert ok(read_until_closed(sock)) == b"3"


def test_stream_arrives_in_pieces(server, tmp_path):
    _, address = server
    gate = tmp_path / "gate"
    with connect(address) as sock:
        sock.sendall(request_bytes(f"/gate?path={gate}"))
        got = b""
        while FIRST not in got:
            more = sock.recv(65536)
            assert more
            got += more
        assert SECOND not in got
        gate.touch()
        assert (got + read_until_closed(sock)).endswith(FIRST + SECOND)


def test_app_exception_is_500_then_next_request_works(server):
    _, address = server
    status, _, _ = parse_cgi(scgi_request(address, "/error"))
    assert status == 500
    assert ok(scgi_request(address, "/")) == b"hello"


def test_error_mid_stream_cuts_the_response(server):
    _, address = server
    with connect(address) as sock:
        sock.sendall(request_bytes("/error-mid"))
        got = b""
        with pytest.raises(ConnectionResetError):  # a reset, not a clean end
            for _ in range(1000):
                more = sock.recv(65536)
                if not more:
                    break
                got += more
    assert ok(scgi_request(address, "/")) == b"hello"


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "netstring"),
        (b"70000:" + b"x" * 100, "--max-params-size"),
        (request_bytes("/echo", "POST", b"abc") + b"extra", "beyond CONTENT_LENGTH"),
    ],
    ids=["http", "oversize", "body-too-long"],
)
def test_bad_peer_is_closed_with_one_line_and_the_server_goes_on(server, garbage, reason):
    proc, address = server
    seen = len(proc.output())
    with connect(address) as sock:
        port = sock.getsockname()[1]
        sock.sendall(garbage)
        try:
            read_until_closed(sock)
        except ConnectionResetError:
            pass
    assert ok(scgi_request(address, "/")) == b"hello"
    deadline = time.monotonic() + 5
    while True:
        new = [line for line in proc.output()[seen:].splitlines() if "WARNING" in line]
        if new or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(new) == 1, new
    assert f"127.0.0.1:{port}" in new[0] and reason in new[0], new[0]
    assert "Traceback" not in proc.output()[seen:]


def test_connect_and_close_is_not_logged(server):
    proc, address = server
    seen = len(proc.output())
    with connect(address):
        pass
    assert ok(scgi_request(address, "/")) == b"hello"
    assert "WARNING" not in proc.output()[seen:]


def test_sigterm_finishes_the_request_in_flight(procs, tmp_path):
    for engine in ENGINES:
        proc, address = start(procs, engine)
        gate = tmp_path / f"gate-{engine}"
        with connect(address) as busy, connect(address) as silent:
            busy.sendall(request_bytes(f"/gate?path={gate}"))
            got = b""
            while FIRST not in got:
                got += busy.recv(65536)
            proc.send(signal.SIGTERM)
            assert read_until_closed(silent) == b""  # no request came: closed in the drain
            gate.touch()
            assert (got + read_until_closed(busy)).endswith(SECOND)
        assert proc.wait(15) == 0, proc.output()


@pytest.mark.parametrize("engine", ENGINES)
def test_unix_socket_and_inherited_fd(procs, engine, short_tmp):
    path = str(short_tmp / "s.sock")
    proc = procs.chaussette(
        "--protocol", "scgi", "--backend", engine, "--host", f"unix:{path}", APP
    )
    wait_scgi(path, proc)
    assert ok(scgi_request(path, "/")) == b"hello"
    assert proc.stop() == 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOCAL, 0))
        listener.listen(16)
        fd = listener.fileno()
        proc = procs.chaussette(
            "--protocol", "scgi", "--backend", engine, "--fd", str(fd), APP, pass_fds=(fd,)
        )
        wait_scgi(listener.getsockname(), proc)
        assert ok(scgi_request(listener.getsockname(), "/")) == b"hello"


@pytest.mark.parametrize("model", ["free", "free:max=1,timeout=0.5", "rplex", "single"])
def test_request_model(procs, model):
    proc, address = start(procs, "threads", "--request-model", model)
    body = os.urandom(300_000)
    answer = ok(scgi_request(address, "/echo", "POST", body))
    assert answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
    assert ok(scgi_request(address, "/stream?n=3&pause=0.02")) == b"chunk 0\nchunk 1\nchunk 2\n"
    assert parse_cgi(scgi_request(address, "/error"))[0] == 500
    assert proc.stop() == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_raw_handler(procs, engine):
    _, address = start(procs, engine, "--raw-handler", app="tests.fcgi_client:raw_echo")
    status, _, body = parse_cgi(scgi_request(address, "/", "PUT", b"payload"))
    assert (status, body) == (201, b"PUT payload")


# -- bounds and timeouts --

POOL_FLAG = {"threads": "--threads", "gevent": "--spawn", "eventlet": "--spawn"}


@pytest.mark.parametrize("engine", ENGINES)
def test_silent_connections_take_no_request_slot(procs, engine):
    """As many connections as request slots, each sending the start of a netstring and then
    nothing: a good request on another connection is still answered (the slots are taken
    once a request head is complete, not on accept)."""
    _, address = start(procs, engine, POOL_FLAG[engine], "2")
    with connect(address) as one, connect(address) as two:
        for sock in (one, two):
            sock.sendall(b"5")
        assert ok(scgi_request(address, "/", timeout=5)) == b"hello"


@pytest.mark.parametrize("engine", ENGINES)
def test_timeout_closes_a_connection_stuck_in_its_head(procs, engine):
    proc, address = start(procs, engine, "--timeout", "1")
    with connect(address) as stuck:
        stuck.sendall(b"40:CONTENT_LEN")  # half a netstring, then silence
        assert ok(scgi_request(address, "/", timeout=5)) == b"hello"  # served meanwhile
        assert read_until_closed(stuck) == b""  # closed: each wait bounded by 10 s
    assert ok(scgi_request(address, "/")) == b"hello"
    assert "Traceback" not in proc.output()


@pytest.mark.parametrize("engine", ENGINES)
def test_short_body_is_logged_once(procs, engine):
    proc, address = start(procs, engine)
    seen = len(proc.output())
    with connect(address) as sock:
        data = request_bytes("/echo", "POST", b"x" * 100)
        sock.sendall(data[:-97])  # the head and 3 body bytes, then the end
        sock.shutdown(socket.SHUT_WR)
        read_until_closed(sock)
    assert ok(scgi_request(address, "/")) == b"hello"
    lines = [
        line
        for line in proc.output()[seen:].splitlines()
        if "WARNING" in line or "went away" in line or "ERROR" in line
    ]
    assert len(lines) == 1, lines
    assert "still to come" in lines[0], lines
    assert "Traceback" not in proc.output()[seen:]
