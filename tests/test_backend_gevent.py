"""What the ``gevent`` and ``fastgevent`` backends do beyond the conformance suite
(tests/test_http_backends.py): monkey-patching, the greenlet pool, the drain of idle and
silent connections, timeouts, keep-alive details, logs, restarts.

Real ``chaussette`` processes on real sockets. Ordering, not clocks: a response is held open
by a gate file the test creates (``/gate`` of tests/apps/http_app.py).
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import (
    HTTPResponse,
    Proc,
    connect,
    free_port,
    http_request,
    parse_response,
    read_until,
    read_until_closed,
    require_module,
    wait_http,
)
from tests.test_wsgiref import _server_socket_for

require_module("gevent", "pip install 'chaussette[gevent]'")

APP = "tests.apps.http_app:application"
BACKENDS = ("gevent", "fastgevent")
MiB = 1 << 20
LOG_LINE_START = "20"  # every line of our log starts with the year


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start(procs, backend: str, *extra: str, app: str = APP, cwd: Path | None = None) -> Proc:
    """chaussette on a fresh TCP port; returns when it answers. ``proc.address`` is set."""
    port = free_port()
    proc = procs.chaussette("--backend", backend, "--port", str(port), *extra, app, cwd=cwd)
    proc.address = ("127.0.0.1", port)
    wait_http(proc.address, proc)
    return proc


def gate(tmp_path: Path, name: str, close: bool = True) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET /gate?dir={tmp_path}&name={name} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def get(target: str = "/", *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"GET {target} {version}", "Host: x", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(sock: socket.socket, buf: bytes = b"") -> tuple[HTTPResponse, bytes]:
    """One Content-Length framed response off a keep-alive connection, and what follows."""
    data = read_until(sock, b"\r\n\r\n", buf)
    head, _, rest = data.partition(b"\r\n\r\n")
    resp = parse_response(head + b"\r\n\r\n", head_only=True)
    length = int(resp.header("Content-Length") or 0)
    while len(rest) < length:
        more = sock.recv(65536)
        assert more, f"closed inside a body: {head!r}"
        rest += more
    resp.body, rest = rest[:length], rest[length:]
    return resp, rest


def closed_by_server(sock: socket.socket) -> bool:
    return read_until_closed(sock) == b""


def wait_exit(proc: Proc, signum: int = signal.SIGTERM) -> int:
    proc.send(signum)
    return proc.wait(20)


def write_app(path: Path, source: str) -> str:
    path.write_text(textwrap.dedent(source))
    return str(path)


# -- monkey-patching and the hub --

PATCH_PROBE = """\
import threading

from gevent import monkey

PATCHED = {m: monkey.is_module_patched(m) for m in ("socket", "threading", "time")}


def application(environ, start_response):
    body = repr(sorted(m for m, on in PATCHED.items() if on)).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.mark.parametrize("monkey", [True, False], ids=["monkey", "no-monkey"])
def test_monkey_patching_happens_before_the_app_is_imported(
    procs, tmp_path: Path, backend: str, monkey: bool
) -> None:
    app = write_app(tmp_path / "probe.py", PATCH_PROBE)
    extra = () if monkey else ("--no-monkey",)
    proc = start(procs, backend, *extra, app=app)
    body = http_request(proc.address, "/").body
    assert body == (b"['socket', 'threading', 'time']" if monkey else b"[]")
    # without monkey-patching too, the hub serves while the main thread waits for signals
    for _ in range(3):
        assert http_request(proc.address, "/").status == 200
    assert wait_exit(proc) == 0, proc.output()


CRASHING_GREENLET = """\
import gevent


def fail():
    raise ValueError("a greenlet of the app failed")


def application(environ, start_response):
    if environ["PATH_INFO"] == "/spawn":
        gevent.spawn(fail).join()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
"""


def test_what_the_hub_would_print_goes_to_our_log(procs, tmp_path: Path, backend: str) -> None:
    app = write_app(tmp_path / "crash.py", CRASHING_GREENLET)
    proc = start(procs, backend, app=app)
    assert http_request(proc.address, "/spawn").body == b"ok"
    proc.wait_for_output("a greenlet of the app failed")
    out = proc.output()
    assert "[ERROR] unexpected error" in out, out
    assert "failed with ValueError" not in out, out  # gevent's own stderr report
    assert http_request(proc.address, "/").body == b"ok"
    assert wait_exit(proc) == 0, proc.output()


# -- the pool --


def test_spawn_bounds_the_connections_served_at_once(procs, tmp_path: Path, backend: str) -> None:
    proc = start(procs, backend, "--spawn", "2")
    with contextlib.ExitStack() as stack:
        held = {}
        for name in ("a", "b"):
            sock = stack.enter_context(connect(proc.address))
            sock.sendall(gate(tmp_path, name))
            held[name] = (sock, read_until(sock, b"open\n"))
        third = stack.enter_context(connect(proc.address))  # the kernel accepts it
        third.sendall(get("/", "Connection: close"))
        ready, _, _ = select.select([third], [], [], 0.5)
        assert not ready, "a third connection was served while 2 of 2 greenlets were busy"
        (tmp_path / "a").touch()
        sock_a, first_a = held["a"]
        assert parse_response(first_a + read_until_closed(sock_a)).body == b"open\ndone\n"
        # a greenlet is free now, while "b" still holds the other one
        assert parse_response(read_until_closed(third)).body == b"hello"
        (tmp_path / "b").touch()
        sock_b, first_b = held["b"]
        assert parse_response(first_b + read_until_closed(sock_b)).body == b"open\ndone\n"
    assert wait_exit(proc) == 0, proc.output()


# -- the drain --


def test_drain_closes_idle_connections_and_gives_silent_ones_a_grace(
    procs, tmp_path: Path, backend: str
) -> None:
    proc = start(procs, backend, "--graceful-timeout", "20")
    with contextlib.ExitStack() as stack:
        idle = stack.enter_context(connect(proc.address))
        idle.sendall(get("/"))
        assert read_response(idle)[0].body == b"hello"
        late = stack.enter_context(connect(proc.address))  # accepted, says nothing yet
        silent = stack.enter_context(connect(proc.address))  # accepted, never says anything
        busy = stack.enter_context(connect(proc.address))
        busy.sendall(gate(tmp_path, "go", close=False))
        first = read_until(busy, b"open\n")
        for sock in (late, silent):  # the server holds them: accepted before the stop
            server_end = _server_socket_for(proc.pid, sock)
            assert server_end is not None, "not accepted"
            server_end.close()
        mark = len(proc.output())
        proc.send(signal.SIGTERM)
        proc.wait_for_output("SIGTERM: stopping")
        assert closed_by_server(idle)  # at once
        # a new connection that sends its request now, within the grace, is served and
        # told that the connection ends
        late.sendall(get("/"))
        resp, rest = read_response(late)
        assert (resp.status, resp.body) == (200, b"hello")
        assert (resp.header("Connection") or "").lower() == "close"
        assert rest == b"" and closed_by_server(late)
        # one that stays silent is closed after the grace, while a request is still in flight
        assert closed_by_server(silent)
        assert proc.popen.poll() is None, proc.output()
        (tmp_path / "go").touch()
        resp = parse_response(first + read_until_closed(busy))
        assert (resp.status, resp.body) == (200, b"open\ndone\n")
    assert proc.wait(20) == 0, proc.output()
    assert "all requests finished" in proc.output()[mark:]


def test_sighup_restarts_in_place_on_the_same_socket(procs, backend: str) -> None:
    proc = start(procs, backend)
    with connect(proc.address) as idle:  # a keep-alive connection must not hold the restart
        idle.sendall(get("/pid"))
        pid = read_response(idle)[0].body
        assert pid == str(proc.pid).encode()
        mark = len(proc.output())
        proc.send(signal.SIGHUP)
        assert closed_by_server(idle)
    proc.wait_for_output(f"re-exec) with backend {backend}")  # the new image serves
    assert wait_http(proc.address, proc, "/pid").body == pid  # the same process, re-executed
    assert "all requests finished" in proc.output()[mark:]
    assert wait_exit(proc) == 0, proc.output()


# -- timeouts --


def test_idle_keep_alive_connection_is_dropped_after_the_timeout(procs, backend: str) -> None:
    proc = start(procs, backend, "--timeout", "1")
    with connect(proc.address) as idle, connect(proc.address) as stalled:
        idle.sendall(get("/"))
        assert read_response(idle)[0].body == b"hello"
        stalled.sendall(b"GET / HTT")  # a request head that never ends
        assert http_request(proc.address, "/").body == b"hello"  # others are served
        assert closed_by_server(idle)
        assert closed_by_server(stalled)
    assert http_request(proc.address, "/").body == b"hello"
    assert wait_exit(proc) == 0, proc.output()


def test_slow_but_steady_download_outlasts_the_timeout(procs, backend: str) -> None:
    # --timeout bounds each wait for the client, not the whole transfer
    proc = start(procs, backend, "--timeout", "1")
    size = 8 * MiB
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(10)
        sock.connect(proc.address)
        sock.sendall(get(f"/big?size={size}", "Connection: close"))
        data = bytearray()
        started = time.monotonic()
        for _ in range(100_000):
            more = sock.recv(65536)
            if not more:
                break
            data += more
            if time.monotonic() - started < 2.5:
                time.sleep(0.02)  # slow, for longer than --timeout
    resp = parse_response(bytes(data))
    assert len(resp.body) == size
    assert wait_exit(proc) == 0, proc.output()


# -- keep-alive details --


def test_pipelined_requests_are_answered_in_order(procs, backend: str) -> None:
    proc = start(procs, backend)
    with connect(proc.address) as sock:
        sock.sendall(get("/big?size=10") + get("/pid") + get("/", "Connection: close"))
        first, rest = read_response(sock)
        second, rest = read_response(sock, rest)
        third, rest = read_response(sock, rest)
        assert (first.body, second.body, third.body) == (
            b"b" * 10,
            str(proc.pid).encode(),
            b"hello",
        )
        assert rest == b"" and closed_by_server(sock)
    assert wait_exit(proc) == 0, proc.output()


def test_http10_keep_alive_only_when_asked_and_framed(procs, backend: str) -> None:
    proc = start(procs, backend)
    with connect(proc.address) as sock:
        sock.sendall(get("/", "Connection: keep-alive", version="HTTP/1.0"))
        resp, rest = read_response(sock)
        assert resp.body == b"hello"
        assert (resp.header("Connection") or "").lower() == "keep-alive"
        # a body without a length can only end with the connection
        sock.sendall(get("/stream?n=2&pause=0", "Connection: keep-alive", version="HTTP/1.0"))
        raw = rest + read_until_closed(sock)
    resp = parse_response(raw)
    assert resp.body == b"chunk 0\nchunk 1\n"
    assert resp.header("Transfer-Encoding") is None
    with connect(proc.address) as sock:  # HTTP/1.0 without keep-alive: one request
        sock.sendall(get("/", version="HTTP/1.0"))
        assert parse_response(read_until_closed(sock)).body == b"hello"
    assert wait_exit(proc) == 0, proc.output()


def test_fastgevent_closes_after_a_body_the_app_left_unread(procs) -> None:
    proc = start(procs, "fastgevent")
    body = b"x" * 100_000
    post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with connect(proc.address) as sock:
        sock.sendall(post + get("/pid"))
        resp, rest = read_response(sock)
        assert resp.body == b"hello"
        # the rest of the body is not taken for a request: the connection ends instead
        assert rest + read_until_closed(sock) == b""
    assert wait_exit(proc) == 0, proc.output()


def test_fastgevent_refuses_a_malformed_request_on_a_kept_connection(procs) -> None:
    proc = start(procs, "fastgevent")
    with connect(proc.address) as sock:
        sock.sendall(get("/") + b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        resp, rest = read_response(sock)
        assert resp.body == b"hello"
        assert parse_response(rest + read_until_closed(sock)).status == 400
    assert http_request(proc.address, "/").body == b"hello"
    assert wait_exit(proc) == 0, proc.output()


# -- logs --


def test_access_log_only_when_asked(procs, backend: str) -> None:
    quiet = start(procs, backend)
    loud = start(procs, backend, "--access-log", "-")
    for proc in (quiet, loud):
        assert http_request(proc.address, "/big?size=10", headers={"User-Agent": "t/1"}).status
    loud.wait_for_output('"GET /big?size=10 HTTP/1.1" 200 10 "-" "t/1"')
    assert '"GET /big' not in quiet.output()
    for proc in (quiet, loud):
        assert wait_exit(proc) == 0, proc.output()


def test_bad_requests_are_logged_by_us_not_printed(procs, backend: str) -> None:
    proc = start(procs, backend)
    many_headers = b"".join(b"X-H%d: y\r\n" % i for i in range(120))  # pywsgi takes 100
    for raw, statuses in (
        (b"NOT A REQUEST\r\n\r\n", (400,)),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", (400, 431)),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n" + many_headers + b"\r\n", (200, 400)),
    ):
        with connect(proc.address) as sock:
            sock.sendall(raw)
            assert parse_response(read_until_closed(sock)).status in statuses
    proc.wait_for_output("bad request")
    assert http_request(proc.address, "/").body == b"hello"
    assert wait_exit(proc) == 0
    lines = [line for line in proc.output().splitlines() if line.strip()]
    assert all(line.startswith(LOG_LINE_START) for line in lines), proc.output()


# -- the reloader --

VERSIONED = """\
def application(environ, start_response):
    body = b"{version}"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.mark.parametrize("backend", ["gevent", "eventlet"])
def test_reloader_under_monkey_patching_keeps_serving(procs, tmp_path: Path, backend) -> None:
    (tmp_path / "vapp.py").write_text(VERSIONED.format(version="v1"))
    port = free_port()
    proc = procs.chaussette(
        "--backend", backend, "--port", str(port), "--use-reloader", "vapp.py", cwd=tmp_path
    )
    address = ("127.0.0.1", port)
    proc.wait_for_output("serving vapp.py")
    assert http_request(address, "/", timeout=3).body == b"v1"
    # "reloader watching" is logged as the watcher starts: an edit made in the moment
    # before its watch is set up goes unseen, so edit again (bounded) until it is seen
    for attempt in range(5):
        (tmp_path / "vapp.py").write_text(VERSIONED.format(version="v2") + "#" * attempt)
        with contextlib.suppress(AssertionError):
            proc.wait_for_output("re-executing", timeout=3)
            break
    proc.wait_for_output("re-executing", timeout=1)
    assert wait_http(address, proc, timeout=10).body == b"v2"
