"""The waitress backend beyond the conformance suite (tests/test_http_backends.py): what the
adapter builds on waitress (a drain, HEAD without a body, keep-alive after a chunked body,
the settings it maps) and waitress's own ways, each against a real chaussette process.

The helpers here (``launch``, ``wait_exit``, ``backlog_of``, ...) are shared with
tests/test_backend_tornado.py. Ordering, not clocks: an in-flight request is held by the
gate of tests/apps/http_app.py, or by ``Expect: 100-continue`` (the interim answer proves
the server has read the head; the body is sent when the test says so).
"""

from __future__ import annotations

import hashlib
import json
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    Conn,
    Proc,
    free_port,
    parse_response,
    request_bytes,
    require_peer,
    wait_http,
)

APP = "tests.apps.conf_app:application"
BACKEND = "waitress"


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    """A chunked body, with a chunk extension on the second chunk."""
    out = [
        b"%x%s\r\n%s\r\n" % (len(p), b";ext=1" if i == 1 else b"", p) for i, p in enumerate(pieces)
    ]
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


@dataclass
class Srv:
    proc: Proc
    address: tuple[str, int] | str

    def log(self) -> str:
        return self.proc.output()

    def wait_log(self, text: str, since: int = 0, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.log()[since:]
            if text in out:
                return out
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not in the log:\n{self.log()[since:]}")


def launch(procs, backend: str, *args: str, unix: Path | None = None, **kw) -> Srv:
    """chaussette with this backend on a fresh port (or unix path); returns once it answers."""
    where: list[str]
    address: tuple[str, int] | str
    if unix is not None:
        address, where = str(unix), ["--host", f"unix:{unix}"]
    elif "--fd" in args:
        address, where = kw.pop("address"), []
    else:
        port = free_port()
        address, where = ("127.0.0.1", port), ["--port", str(port)]
    proc = procs.chaussette("--backend", backend, *where, *args, APP, **kw)
    wait_http(address, proc)
    return Srv(proc, address)


def fetch(address: tuple[str, int] | str, method: str, target: str, *headers: str, body=b""):
    with Conn(address) as conn:
        conn.send(request_bytes(method, target, *headers, body=body))
        resp = conn.response(head_only=method == "HEAD")
        assert conn.closed_by_server(), "bytes after the response"
    return resp


def environ_of(address: tuple[str, int] | str, *headers: str) -> dict[str, str]:
    resp = fetch(address, "GET", "/env/x", *headers)
    assert resp.status == 200, resp.raw[:300]
    environ: dict[str, str] = json.loads(resp.body)
    return environ


def wait_exit(proc: Proc, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def backlog_of(port: int) -> int:
    """The backlog of the listening TCP socket on ``port``, as the kernel reports it."""
    ss = require_peer("ss", "iproute2")
    out = subprocess.run(
        [ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert len(rows) == 1, out
    return int(rows[0][2])  # State Recv-Q Send-Q: a listener's Send-Q is its backlog


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- tests shared with the tornado backend (parametrized there with its name) --


def check_inherited_socket_keeps_its_backlog(procs, backend: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(7)  # a manager's choice, unlike our --backlog default
        port = sock.getsockname()[1]
        srv = launch(
            procs,
            backend,
            "--fd",
            str(sock.fileno()),
            pass_fds=(sock.fileno(),),
            address=("127.0.0.1", port),
        )
    assert fetch(srv.address, "GET", "/").body == b"hello"
    assert backlog_of(port) == 7
    assert srv.proc.stop() == 0


def check_request_being_received_is_drained(procs, backend: str, *extra: str) -> None:
    """SIGTERM while a request body is still coming: the request is served, its response
    says the connection ends, an idle keep-alive connection is closed at once, exit 0."""
    srv = launch(procs, backend)
    body = b"z" * 300_000
    head = request_bytes("POST", "/echo", "Expect: 100-continue", *extra, close=False)
    head = head.replace(b"\r\n\r\n", f"\r\nContent-Length: {len(body)}\r\n\r\n".encode(), 1)
    with Conn(srv.address) as idle, Conn(srv.address) as busy:
        idle.send(request_bytes("GET", "/", close=False))
        assert idle.response().body == b"hello"
        busy.send(head)
        assert busy.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 100 ")  # the head is read
        srv.proc.send(signal.SIGTERM)
        assert idle.closed_by_server()  # the drain has begun; the other is still coming
        busy.send(body)
        resp = busy.response()
        assert (resp.status, resp.body) == (200, f"{len(body)} {sha(body)}".encode())
        assert (resp.header("Connection") or "").lower() == "close"
        assert busy.closed_by_server()
    assert wait_exit(srv.proc, 15) == 0, srv.log()
    assert "all requests finished" in srv.log()


def check_sighup_restarts_in_place(procs, backend: str, tmp_path: Path) -> None:
    """SIGHUP: the request in flight completes, a client that connects meanwhile waits in
    the listen queue and is answered by the new image, on the same socket and pid."""
    srv = launch(procs, backend)
    pid = fetch(srv.address, "GET", "/pid").body
    with Conn(srv.address) as busy:
        busy.send(request_bytes("GET", f"/gate?dir={tmp_path}&name=go"))
        first = busy.read_until(b"open\n")
        mark = len(srv.log())
        srv.proc.send(signal.SIGHUP)
        srv.wait_log("SIGHUP: restarting in place", since=mark)
        with Conn(srv.address, timeout=20) as waiting:
            waiting.send(request_bytes("GET", "/pid"))
            (tmp_path / "go").touch()
            assert parse_response(first + busy.read_to_eof()).body == b"open\ndone\n"
            assert waiting.response().body == pid
    out = srv.wait_log("re-exec) with backend " + backend, since=mark)
    assert "all requests finished" in out
    assert fetch(srv.address, "GET", "/pid").body == pid
    assert srv.proc.stop() == 0, srv.log()


def check_stuck_request_does_not_hold_the_exit(procs, backend: str, tmp_path: Path) -> None:
    """Past --graceful-timeout the process exits (1), though the app's thread is still busy."""
    srv = launch(procs, backend, "--graceful-timeout", "1")
    with Conn(srv.address) as conn:
        # the gate is never opened: the app holds its thread for 20 s
        conn.send(request_bytes("GET", f"/gate?dir={tmp_path}&name=never"))
        conn.read_until(b"open\n")
        srv.proc.send(signal.SIGTERM)
        code = wait_exit(srv.proc, 15)
    assert code == 1, srv.log()
    assert "graceful timeout (1.0s) passed: cutting 1 request(s)" in srv.log()


def check_threads_bound_the_requests_served_at_once(procs, backend: str, tmp_path: Path) -> None:
    srv = launch(procs, backend, "--threads", "2")
    with Conn(srv.address) as a, Conn(srv.address) as b, Conn(srv.address) as third:
        firsts = {}
        for name, conn in (("a", a), ("b", b)):
            conn.send(request_bytes("GET", f"/gate?dir={tmp_path}&name={name}"))
            firsts[name] = conn.read_until(b"open\n")
        third.send(request_bytes("GET", "/"))
        ready, _, _ = select.select([third.sock], [], [], 0.5)
        assert not ready, "a third request was served while 2 of 2 threads were busy"
        (tmp_path / "a").touch()
        assert parse_response(firsts["a"] + a.read_to_eof()).body == b"open\ndone\n"
        assert third.response().body == b"hello"  # a thread is free, "b" holds the other
        (tmp_path / "b").touch()
        assert parse_response(firsts["b"] + b.read_to_eof()).body == b"open\ndone\n"


def check_idle_connection_is_closed_after_the_timeout(procs, backend: str) -> None:
    srv = launch(procs, backend, "--timeout", "1")
    with Conn(srv.address, timeout=15) as conn:
        conn.send(request_bytes("GET", "/", close=False))
        assert conn.response().body == b"hello"
        assert conn.closed_by_server()  # silent for longer than --timeout
    with Conn(srv.address, timeout=15) as conn:
        assert conn.closed_by_server()  # nothing sent at all
    assert fetch(srv.address, "GET", "/").body == b"hello"


def check_stalled_upload_is_dropped(procs, backend: str, chunked_body: bool) -> None:
    """A client silent for --timeout in the middle of its body loses its connection; the app
    never sees the request."""
    srv = launch(procs, backend, "--timeout", "1")
    framing = "Transfer-Encoding: chunked" if chunked_body else "Content-Length: 100000"
    with Conn(srv.address, timeout=15) as conn:
        conn.send(request_bytes("POST", "/echo", framing) + (b"400\r\n" if chunked_body else b""))
        conn.send(b"x" * 1000)
        raw = conn.read_to_eof()  # closed after the silence
        assert b"200 OK" not in raw, raw
    assert fetch(srv.address, "GET", "/").body == b"hello"


def check_access_log(procs, backend: str, tmp_path: Path) -> None:
    logfile = tmp_path / "access.log"
    srv = launch(procs, backend, "--access-log", str(logfile))
    fetch(srv.address, "GET", "/?q=1", "User-Agent: probe/1", "Referer: http://r/")
    fetch(srv.address, "GET", "/error")
    fetch(srv.address, "HEAD", "/big")
    assert srv.proc.stop() == 0
    lines = logfile.read_text().splitlines()

    def line_of(request: str) -> str:
        # by content, not position: a line is written after its response went out, so
        # the next request's line can come first
        found = [line for line in lines if f'"{request} HTTP/1.1"' in line]
        assert len(found) == 1, lines
        return found[0]

    first = line_of("GET /?q=1")
    assert '"GET /?q=1 HTTP/1.1" 200 5 "http://r/" "probe/1"' in first
    assert first.startswith("127.0.0.1 - - [")
    assert '"GET /error HTTP/1.1" 500 ' in line_of("GET /error")
    assert '"HEAD /big HTTP/1.1" 200 ' in line_of("HEAD /big")
    assert "HTTP/1.1" not in srv.log()  # nothing of it in the main log


def check_no_access_log_by_default(procs, backend: str) -> None:
    srv = launch(procs, backend)
    fetch(srv.address, "GET", "/")
    assert srv.proc.stop() == 0
    assert '"GET / HTTP/1.1"' not in srv.log()


# -- waitress --


def test_inherited_socket_keeps_its_backlog(procs) -> None:
    check_inherited_socket_keeps_its_backlog(procs, BACKEND)


def test_request_being_received_is_drained(procs) -> None:
    check_request_being_received_is_drained(procs, BACKEND)


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


def test_request_line_and_header_limits(procs) -> None:
    srv = launch(procs, BACKEND, "--limit-request-line", "100", "--limit-request-headers", "2000")
    assert fetch(srv.address, "GET", "/" + "x" * 200).status == 414
    many = [f"X-Filler-{i}: {'v' * 40}" for i in range(60)]
    assert fetch(srv.address, "GET", "/", *many).status == 431
    assert fetch(srv.address, "GET", "/" + "x" * 50).status == 404  # within both bounds


def test_proxy_headers_reach_the_app(procs) -> None:
    # waitress would drop them (clear_untrusted_proxy_headers): the other backends do not
    srv = launch(procs, BACKEND)
    env = environ_of(
        srv.address,
        "X-Forwarded-For: 192.0.2.1",
        "X-Forwarded-Proto: https",
        "Forwarded: for=192.0.2.1;proto=https",
    )
    assert env["HTTP_X_FORWARDED_FOR"] == "192.0.2.1"
    assert env["HTTP_X_FORWARDED_PROTO"] == "https"
    assert env["HTTP_FORWARDED"] == "for=192.0.2.1;proto=https"


def test_head_of_a_file_sends_no_body(procs) -> None:
    # waitress sends a file wrapper's bytes, and any body, even to a HEAD request
    srv = launch(procs, BACKEND)
    with Conn(srv.address) as conn:
        for target, length in (("/file?size=100000", "100000"), ("/file-nolen?size=5000", "5000")):
            conn.send(request_bytes("HEAD", target, close=False))
            resp = conn.response(head_only=True)
            assert (resp.status, resp.header("Content-Length")) == (200, length)
        conn.send(request_bytes("HEAD", "/stream?n=2&pause=0", close=False))
        assert conn.response(head_only=True).status == 200
        conn.send(request_bytes("GET", "/"))  # nothing stray came before this answer
        assert conn.response().raw.startswith(b"HTTP/1.1 200 ")
        assert conn.closed_by_server()


def test_http10_streamed_response_ends_with_the_connection(procs) -> None:
    srv = launch(procs, BACKEND)
    with Conn(srv.address) as conn:
        conn.send(b"GET /stream?n=2&pause=0 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = parse_response(conn.read_to_eof())
    assert resp.body == b"chunk 0\nchunk 1\n"
    assert (resp.header("Connection") or "close").lower() == "close"


@pytest.mark.parametrize("level", ["info", "debug"])
def test_queue_depth_warnings_only_in_debug(procs, tmp_path: Path, level: str) -> None:
    # waitress warns for every request that waits for a free thread: a busy server's
    # normal state, whose only effect is the listen queue --threads is sized for
    srv = launch(procs, BACKEND, "--threads", "1", "--log-level", level)
    with Conn(srv.address) as held, Conn(srv.address) as queued:
        held.send(request_bytes("GET", f"/gate?dir={tmp_path}&name=go"))
        first = held.read_until(b"open\n")
        queued.send(request_bytes("GET", "/"))
        if level == "debug":
            srv.wait_log("Task queue depth is 1")
        (tmp_path / "go").touch()
        assert parse_response(first + held.read_to_eof()).body == b"open\ndone\n"
        assert queued.response().body == b"hello"
    assert srv.proc.stop() == 0
    assert ("Task queue depth" in srv.log()) == (level == "debug"), srv.log()


def test_unix_socket_environ(procs, short_tmp: Path) -> None:
    path = short_tmp / "w.sock"
    srv = launch(procs, BACKEND, unix=path)
    env = environ_of(srv.address)
    assert env["REMOTE_ADDR"] == str(path)  # as the wsgiref backend says it
    assert env["SERVER_PORT"] == ""
    assert env["SERVER_NAME"] == "localhost"  # from Host
    assert "REMOTE_PORT" not in env
