"""The wsgiref backend against a real ``chaussette --backend wsgiref`` process.

Most tests run four times: on a TCP port and on a unix socket that chaussette binds, each
with the plain test app and with the same app inside ``wsgiref.validate.validator``; after
every test the log must show no AssertionError, WSGIWarning, unexpected traceback or 500.
Tests that need their own flags (bounds, timeouts, signals) start their own process.

Ordering, not clocks: a streamed or in-flight response is held open by a gate file the test
creates (``/gate`` in tests/apps/http_app.py), so "X answered while Y was still running"
is observed, never timed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.apps.http_app import pattern
from tests.conftest import (
    HTTPResponse,
    Proc,
    chaussette_cmd,
    connect,
    dechunk,
    free_port,
    http_request,
    parse_response,
    read_until,
    read_until_closed,
    wait_http,
)

APP = "tests.apps.http_app:application"
VALIDATED = "tests.apps.http_validated:application"
MiB = 1 << 20


@dataclass
class Server:
    address: tuple[str, int] | str
    proc: Proc
    kind: str  # "tcp" or "unix"
    validated: bool = False
    errors_expected: bool = field(default=False)

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


def start(procs_or_list, kind: str, sock_dir: Path, *extra: str, app: str = APP) -> Server:
    """Start chaussette on a fresh TCP port or unix socket; return when it answers."""
    if kind == "tcp":
        port = free_port()
        args = ["--port", str(port)]
        address: tuple[str, int] | str = ("127.0.0.1", port)
    else:
        address = str(sock_dir / "s.sock")
        args = ["--host", f"unix:{address}"]
    cmd = chaussette_cmd("--backend", "wsgiref", *args, *extra, app)
    if isinstance(procs_or_list, list):
        proc = Proc(cmd)
        procs_or_list.append(proc)
    else:
        proc = procs_or_list.start(cmd)
    wait_http(address, proc)
    return Server(address, proc, kind, validated=(app == VALIDATED))


@pytest.fixture(
    scope="module",
    params=[("tcp", APP), ("unix", APP), ("tcp", VALIDATED), ("unix", VALIDATED)],
    ids=["tcp", "unix", "tcp-validated", "unix-validated"],
)
def server(request) -> Iterator[Server]:
    kind, app = request.param
    sock_dir = Path(tempfile.mkdtemp(prefix="chs-", dir="/tmp"))
    started: list[Proc] = []
    try:
        srv = start(started, kind, sock_dir, app=app)
        yield srv
        assert srv.proc.stop() == 0, srv.log()
        # what was logged after a test's own window (e.g. by close() after the response)
        assert "AssertionError" not in srv.log() and "WSGIWarning" not in srv.log()
    finally:
        for proc in started:
            if proc.popen.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc._log.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def srv(server: Server) -> Iterator[Server]:
    """The module's server; after the test, its log lines must be clean."""
    mark = len(server.log())
    server.errors_expected = False
    yield server
    new = server.log()[mark:]
    assert "AssertionError" not in new, new
    assert "WSGIWarning" not in new, new
    if not server.errors_expected:
        assert "Traceback" not in new, new
        assert "answered 500" not in new, new


# -- raw HTTP helpers --


def exchange(
    address: tuple[str, int] | str, data: bytes, timeout: float = 10, half_close: bool = False
) -> bytes:
    """Send raw bytes on a new connection; everything the server sends until it closes.
    ``half_close``: then tell the server nothing more is coming (a cut request)."""
    with connect(address, timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all
        return read_until_closed(sock)


def get(address: tuple[str, int] | str, target: str, *header_lines: str) -> HTTPResponse:
    head = f"GET {target} HTTP/1.1\r\nHost: localhost\r\n" + "".join(
        f"{line}\r\n" for line in header_lines
    )
    return parse_response(exchange(address, head.encode("latin-1") + b"\r\n"))


def environ_of(address: tuple[str, int] | str, target: str, *header_lines: str) -> dict:
    resp = get(address, target, *header_lines)
    assert resp.status == 200, resp.raw[:500]
    return json.loads(resp.body)


def assert_serving(address: tuple[str, int] | str) -> None:
    resp = http_request(address, "/")
    assert (resp.status, resp.body) == (200, b"hello")


def body_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- requests and responses --


def test_get(srv: Server) -> None:
    resp = http_request(srv.address, "/")
    assert (resp.status, resp.body) == (200, b"hello")
    assert resp.header("Content-Length") == "5"
    assert resp.header("Connection") == "close"
    assert resp.header("Date")
    assert (resp.header("Server") or "").startswith("chaussette/")
    assert resp.raw.endswith(b"\r\n\r\nhello")  # nothing after the body


@pytest.mark.parametrize(
    "target", ["/", "/big", "/stream?n=2&pause=0", "/file?size=100000", "/file-nolen?size=5000"]
)
def test_head_sends_headers_only(srv: Server, target: str) -> None:
    raw = exchange(srv.address, f"HEAD {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    _, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep and rest == b"", raw[:300]
    resp = parse_response(raw, head_only=True)
    assert resp.status == 200
    assert resp.header("Content-Type")
    assert resp.header("Transfer-Encoding") is None
    if target == "/big":
        assert resp.header("Content-Length") == str(64 * 1024)


def test_query_string_is_raw(srv: Server) -> None:
    env = environ_of(srv.address, "/env/q?a=%20b&c=%C3%A9&d=x%26y&e")
    assert env["QUERY_STRING"] == "a=%20b&c=%C3%A9&d=x%26y&e"
    assert env["PATH_INFO"] == "/env/q"
    assert env["SCRIPT_NAME"] == ""
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"


@pytest.mark.parametrize("encoded", [True, False], ids=["percent-encoded", "raw-utf8"])
def test_non_ascii_path_is_latin1_decoded_bytes(srv: Server, encoded: bool) -> None:
    wire = "/env/café/ü x".encode()  # what the client means, as UTF-8 bytes
    if encoded:
        target = "/env/caf%C3%A9/%C3%BC%20x"
    else:  # unescaped bytes in the request line: sent as they are
        target = wire.replace(b" ", b"%20").decode("latin-1")
    env = environ_of(srv.address, target)
    assert env["PATH_INFO"] == wire.decode("latin-1")  # PEP 3333: bytes as latin-1
    assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/env/café/ü x"
    assert env["REQUEST_URI"] == target


def test_repeated_headers_are_joined(srv: Server) -> None:
    env = environ_of(
        srv.address,
        "/env/h",
        "X-Multi: a",
        "Cookie: a=1",
        "X-Multi: b, c",
        "Cookie: b=2",
        "Accept: text/plain",
    )
    assert env["HTTP_X_MULTI"] == "a, b, c"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["HTTP_ACCEPT"] == "text/plain"
    assert env["HTTP_HOST"] == "localhost"


def test_underscore_header_names_are_dropped(srv: Server) -> None:
    env = environ_of(
        srv.address, "/env/u", "X_Forwarded_For: 6.6.6.6", "X-Forwarded-For: 1.2.3.4", "X_Only: 1"
    )
    assert env["HTTP_X_FORWARDED_FOR"] == "1.2.3.4"
    assert "HTTP_X_ONLY" not in env


def test_content_type_and_length_are_not_http_keys(srv: Server) -> None:
    raw = (
        b"POST /env/p HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    env = json.loads(parse_response(exchange(srv.address, raw)).body)
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "3"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env


def test_remote_addr(srv: Server) -> None:
    with connect(srv.address) as sock:
        sock.sendall(b"GET /env/r HTTP/1.1\r\nHost: example.org:81\r\n\r\n")
        env = json.loads(parse_response(read_until_closed(sock)).body)
        if srv.kind == "tcp":
            host, port = sock.getsockname()
            assert env["REMOTE_ADDR"] == host
            assert env["REMOTE_PORT"] == str(port)
            assert env["SERVER_PORT"] == str(srv.address[1])
        else:
            assert env["REMOTE_ADDR"] == srv.address  # the socket path
            assert env["SERVER_NAME"] == "example.org"


# -- request bodies --


@pytest.mark.parametrize("chunk", [1000, 65536, 6 * MiB])
def test_post_5mb_read_in_chunks(srv: Server, chunk: int) -> None:
    body = body_of(5 * MiB)
    resp = http_request(srv.address, f"/echo?chunk={chunk}", "POST", body=body)
    assert resp.status == 200
    assert resp.body.decode() == f"{len(body)} {sha(body)}"


def test_post_5mb_read_with_readline(srv: Server) -> None:
    lines = [f"line {i} {'x' * (i % 97)}\n".encode() for i in range(90_000)]
    body = b"".join(lines) + b"no newline at the end"
    assert len(body) > 5 * MiB
    resp = http_request(srv.address, "/lines", "POST", body=body)
    assert (resp.status, resp.body) == (200, str(len(lines) + 1).encode())
    one_long_line = b"y" * (2 * MiB)
    resp = http_request(srv.address, "/lines", "POST", body=one_long_line)
    assert (resp.status, resp.body) == (200, b"1")


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    out = [
        b"%x;ext=1\r\n%b\r\n" % (len(p), p) if i == 1 else b"%X\r\n%b\r\n" % (len(p), p)
        for i, p in enumerate(pieces)
    ]
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


def test_chunked_request_body(srv: Server) -> None:
    data = body_of(3 * MiB, seed=2)
    sizes = [1, 10, 4096, 100_000, MiB]
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(data[pos : pos + size])
        pos += size
    pieces.append(data[pos:])
    raw = (
        b"POST /echo?chunk=7777 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(pieces, trailer=b"X-Checksum: none\r\n")
    )
    resp = parse_response(exchange(srv.address, raw))
    assert (resp.status, resp.body.decode()) == (200, f"{len(data)} {sha(data)}")


def test_expect_100_continue(srv: Server) -> None:
    body = body_of(MiB, seed=3)
    with connect(srv.address) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = read_until(sock, b"\r\n\r\n")  # nothing of the body is sent yet
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        rest = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
        sock.sendall(body)
        resp = parse_response(rest + read_until_closed(sock))
    assert (resp.status, resp.body.decode()) == (200, f"{len(body)} {sha(body)}")


def test_no_100_continue_when_the_app_does_not_read(srv: Server) -> None:
    with connect(srv.address) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n"
        )
        raw = read_until_closed(sock)  # the server answers without the body and closes
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200]
    assert parse_response(raw).body == b"hello"


# -- responses --


def test_streamed_response_arrives_piece_by_piece(srv: Server, tmp_path: Path) -> None:
    with connect(srv.address) as sock:
        sock.sendall(f"GET /gate?dir={tmp_path}&name=go HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = read_until(sock, b"open\n")
        # the generator is blocked on the gate: the first piece came on its own
        assert b"done" not in first and not first.endswith(b"0\r\n\r\n")
        (tmp_path / "go").touch()
        raw = first + read_until_closed(sock)
    resp = parse_response(raw)
    assert resp.header("Transfer-Encoding") == "chunked"
    assert resp.body == b"open\ndone\n"


def test_64k_response(srv: Server) -> None:
    resp = http_request(srv.address, "/big")
    assert resp.status == 200
    assert resp.header("Content-Length") == "65536"
    assert resp.body == b"b" * 65536
    assert len(resp.raw) == resp.raw.index(b"\r\n\r\n") + 4 + 65536


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/file?size=1000003", b"f" * 1000003),
        ("/file-tail?size=300000&skip=1234", pattern(300000)[1234:]),
        ("/file-nolen?size=200000", pattern(200000)),
    ],
    ids=["sendfile", "from-file-position", "no-length-chunked"],
)
def test_file_wrapper(srv: Server, target: str, expected: bytes) -> None:
    resp = http_request(srv.address, target)
    assert resp.status == 200
    assert resp.body == expected


def test_body_never_exceeds_content_length(srv: Server) -> None:
    srv.errors_expected = True  # the server logs the app's mistake
    raw = exchange(srv.address, b"GET /overlong HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.endswith(b"\r\n\r\n12345"), raw


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_keep_alive_is_off(srv: Server, version: str) -> None:
    with connect(srv.address) as sock:
        sock.sendall(f"GET / {version}\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode())
        raw = read_until_closed(sock)  # returns only because the server closed
    resp = parse_response(raw)
    assert (resp.status, resp.body) == (200, b"hello")
    assert resp.header("Connection") == "close"
    assert raw.count(b"HTTP/1.1 ") == 1


# -- failures --


def test_app_raising_before_start_response_gives_500(srv: Server) -> None:
    srv.errors_expected = True
    mark = len(srv.log())
    resp = http_request(srv.address, "/error")
    assert resp.status == 500
    assert resp.body == b"Internal Server Error\n"
    out = srv.wait_log("boom before start_response", since=mark)
    assert "Traceback (most recent call last)" in out
    assert "RuntimeError: boom before start_response" in out
    assert_serving(srv.address)


def test_app_raising_mid_stream_cuts_the_connection(srv: Server) -> None:
    srv.errors_expected = True
    mark = len(srv.log())
    raw = exchange(srv.address, b"GET /error-mid HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding: chunked" in head
    assert b"first part" in rest
    with pytest.raises(AssertionError, match="cut"):
        dechunk(rest)  # no terminating chunk: the client can tell
    out = srv.wait_log("RuntimeError: boom mid-stream", since=mark)
    assert "connection cut" in out
    assert_serving(srv.address)


def test_client_disconnect_calls_close(srv: Server, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    with connect(srv.address) as sock:
        sock.sendall(
            f"GET /closed?marker={marker}&n=5000&pause=0.002 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        data = b""
        while len(data) < 200_000:
            more = sock.recv(65536)
            assert more
            data += more
        assert data.startswith(b"HTTP/1.1 200 OK")
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.read_text() == "closed"
    srv.wait_log("client went away (GET /closed)")
    assert_serving(srv.address)


def test_slow_client_does_not_delay_others(srv: Server) -> None:
    size = 32 * MiB
    family = socket.AF_UNIX if srv.kind == "unix" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        slow.settimeout(10)
        slow.connect(srv.address)
        slow.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = bytearray(read_until(slow, b"\r\n\r\n"))
        for _ in range(1000):
            if len(data) >= MiB:
                break
            more = slow.recv(65536)
            assert more, "closed early"
            data += more
        # the download is in progress (31 MiB still to come): someone else is served now
        assert_serving(srv.address)
        assert len(data) < size
        for _ in range(100_000):
            more = slow.recv(262144)
            if not more:
                break
            data += more
            time.sleep(0.002)
    resp = parse_response(bytes(data))
    assert resp.header("Content-Length") == str(size)
    assert len(resp.body) == size and resp.body.count(b"b") == size


# -- one process per test: flags, signals --


@pytest.fixture
def sock_dir(short_tmp: Path) -> Path:
    return short_tmp


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_sigterm_lets_the_request_in_flight_finish(
    procs, sock_dir: Path, tmp_path: Path, kind: str
) -> None:
    srv = start(procs, kind, sock_dir)
    with connect(srv.address) as sock:
        sock.sendall(f"GET /gate?dir={tmp_path}&name=go HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = read_until(sock, b"open\n")
        srv.proc.send(signal.SIGTERM)
        srv.wait_log("SIGTERM: stopping")
        assert srv.proc.popen.poll() is None  # still draining our request
        (tmp_path / "go").touch()
        resp = parse_response(first + read_until_closed(sock))
    assert resp.body == b"open\ndone\n"
    assert srv.proc.wait(10) == 0, srv.log()
    assert "all requests finished" in srv.log()


def _server_socket_for(pid: int, client: socket.socket) -> socket.socket | None:
    """The server's end of ``client``, duplicated out of process ``pid`` (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd_getfd = 438  # the same number on every Linux architecture
    want = client.getsockname()
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(pidfd_getfd, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                    pytest.skip(f"pidfd_getfd not allowed here: {os.strerror(err)}")
                continue
            sock = socket.socket(fileno=fd)
            try:
                if sock.family == client.family and sock.getpeername() == want:
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    return None


def test_tcp_nodelay_on_accepted_connections(procs, sock_dir: Path, tmp_path: Path) -> None:
    srv = start(procs, "tcp", sock_dir)
    with connect(srv.address) as sock:
        sock.sendall(f"GET /gate?dir={tmp_path}&name=go HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = read_until(sock, b"open\n")  # the server's end is open and in use
        server_end = _server_socket_for(srv.proc.pid, sock)
        assert server_end is not None, "no socket of the server is connected to us"
        with server_end:
            assert server_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        (tmp_path / "go").touch()
        assert parse_response(first + read_until_closed(sock)).body == b"open\ndone\n"


def test_threads_bound_queues_the_next_connection(procs, sock_dir: Path, tmp_path: Path) -> None:
    srv = start(procs, "tcp", sock_dir, "--threads", "2")
    with contextlib.ExitStack() as stack:
        held = {}
        for name in ("a", "b"):
            sock = stack.enter_context(connect(srv.address))
            request = f"GET /gate?dir={tmp_path}&name={name} HTTP/1.1\r\nHost: x\r\n\r\n"
            sock.sendall(request.encode())
            held[name] = (sock, read_until(sock, b"open\n"))
        third = stack.enter_context(connect(srv.address))  # the kernel accepts it
        third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        ready, _, _ = select.select([third], [], [], 0.5)
        assert not ready, "a third request was served while 2 of 2 threads were busy"
        (tmp_path / "a").touch()
        sock_a, first_a = held["a"]
        assert parse_response(first_a + read_until_closed(sock_a)).body == b"open\ndone\n"
        # a slot is free now, while "b" still holds the other one
        assert parse_response(read_until_closed(third)).body == b"hello"
        (tmp_path / "b").touch()
        sock_b, first_b = held["b"]
        assert parse_response(first_b + read_until_closed(sock_b)).body == b"open\ndone\n"


THREAD_APP = """
import os, threading, time

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"%d open\\n" % threading.get_native_id()
    gate = environ["QUERY_STRING"]
    for _ in range(1000 if gate else 0):
        if os.path.exists(gate):
            break
        time.sleep(0.01)
    yield b"%d threads\\n" % threading.active_count()
"""


def test_idle_workers_serve_the_next_connections(procs, sock_dir: Path, tmp_path: Path) -> None:
    """Workers outlive their connection: once --threads of them exist, later connections
    are served by those same threads and no thread is started."""
    (tmp_path / "threadapp.py").write_text(THREAD_APP)
    gate = tmp_path / "gate"
    srv = start(
        procs, "tcp", sock_dir, "--threads", "3", "--python-path", str(tmp_path),
        app="threadapp:application",
    )  # fmt: skip
    workers = set()
    with contextlib.ExitStack() as stack:
        held = []
        for _ in range(3):
            sock = stack.enter_context(connect(srv.address))
            sock.sendall(f"GET /?{gate} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            first = read_until(sock, b"open\n")
            workers.add(int(first.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[1].split()[0]))
            held.append((sock, first))
        assert len(workers) == 3  # three at once: three threads
        gate.touch()
        for sock, first in held:
            assert b"threads" in parse_response(first + read_until_closed(sock)).body
    counts = set()
    for _ in range(30):
        ident, count = get(srv.address, "/").body.split(b" open\n")
        assert int(ident) in workers, "a connection was served by a new thread"
        counts.add(int(count.split()[0]))
    assert max(counts) <= 3 + 2, counts  # workers, the accept loop, the main thread


def test_in_flight_drain_and_close_with_worker_threads() -> None:
    """In process: in_flight and wait_idle count the connections being served; the
    workers stay after their requests (daemon threads) and close() ends them."""
    from chaussette.backends.wsgiref import WSGIRefServer
    from chaussette.settings import Settings
    from chaussette.sockets import bind_tcp

    entered = threading.Semaphore(0)
    release = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/hold":
            entered.release()
            release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    before = set(threading.enumerate())
    listener = bind_tcp("127.0.0.1", 0, 16, None)
    server = WSGIRefServer(app, listener, Settings(threads=2))
    server.start()
    try:
        address = listener.sock.getsockname()[:2]
        with connect(address) as a, connect(address) as b:
            for sock in (a, b):
                sock.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            for _ in range(2):
                assert entered.acquire(timeout=10)
            assert server.in_flight() == 2
            assert not server.wait_idle(0.05)
            release.set()
            for sock in (a, b):
                assert parse_response(read_until_closed(sock)).body == b"ok"
        assert server.wait_idle(10)
        assert server.in_flight() == 0
        workers = [
            t for t in threading.enumerate() if t not in before and t.name != "chaussette-accept"
        ]
        assert len(workers) == 2 and all(t.daemon and t.is_alive() for t in workers)
        assert get(address, "/").body == b"ok"  # served by one of them
        assert server.wait_idle(10)
        assert [
            t for t in threading.enumerate() if t not in before and t.name != "chaussette-accept"
        ] == workers
        server.stop_accepting()
    finally:
        release.set()
        server.stop_accepting()
        server.close()
        listener.close()
    for thread in workers:
        thread.join(10)
        assert not thread.is_alive(), "an idle worker outlived close()"


@pytest.mark.parametrize("threads", ["1", "4"])
def test_idle_client_is_dropped(procs, sock_dir: Path, threads: str) -> None:
    srv = start(procs, "tcp", sock_dir, "--timeout", "1", "--threads", threads)
    with connect(srv.address) as idle, connect(srv.address) as stalled:
        stalled.sendall(b"GET / HTT")  # a request head that never ends
        if threads == "4":
            assert_serving(srv.address)  # others are served meanwhile
            ready, _, _ = select.select([idle, stalled], [], [], 0)
            assert not ready, "the idle clients were dropped before the others were served"
        else:  # the one thread is held by a silent client until it is dropped
            assert_serving(srv.address)
        assert read_until_closed(idle) == b""
        assert read_until_closed(stalled) == b""
    assert_serving(srv.address)


def test_slow_but_steady_download_outlasts_the_timeout(procs, sock_dir: Path) -> None:
    # --timeout bounds each wait for the client, not the whole transfer
    srv = start(procs, "tcp", sock_dir, "--timeout", "1")
    size = 8 * MiB
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(10)
        sock.connect(srv.address)
        sock.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
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


# -- bounds and malformed requests --

LIMIT_LINE, LIMIT_HEADERS = 200, 1000


@pytest.fixture(scope="module")
def bounded() -> Iterator[Server]:
    started: list[Proc] = []
    sock_dir = Path(tempfile.mkdtemp(prefix="chs-", dir="/tmp"))
    try:
        yield start(
            started,
            "tcp",
            sock_dir,
            "--limit-request-line",
            str(LIMIT_LINE),
            "--limit-request-headers",
            str(LIMIT_HEADERS),
        )
    finally:
        for proc in started:
            proc.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def status_of(raw: bytes) -> int:
    return parse_response(raw).status if raw else 0


def test_request_line_limit(bounded: Server) -> None:
    def line_of(length: int) -> bytes:
        fill = length - len(b"GET /? HTTP/1.1\r\n")
        return b"GET /?" + b"q" * fill + b" HTTP/1.1\r\n"

    at_limit, over = line_of(LIMIT_LINE), line_of(LIMIT_LINE + 1)
    assert len(at_limit) == LIMIT_LINE
    assert status_of(exchange(bounded.address, at_limit + b"Host: x\r\n\r\n")) == 200
    assert status_of(exchange(bounded.address, over + b"Host: x\r\n\r\n")) == 414
    assert status_of(exchange(bounded.address, line_of(100_000) + b"Host: x\r\n\r\n")) == 414
    assert_serving(bounded.address)


def test_header_block_limit(bounded: Server) -> None:
    def head_of(size: int) -> bytes:
        start = b"GET / HTTP/1.1\r\n"
        fixed = b"Host: x\r\nX-Fill: \r\n\r\n"
        return start + b"Host: x\r\nX-Fill: " + b"f" * (size - len(fixed)) + b"\r\n\r\n"

    assert status_of(exchange(bounded.address, head_of(LIMIT_HEADERS))) == 200
    assert status_of(exchange(bounded.address, head_of(LIMIT_HEADERS + 1))) == 431
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n"
    assert status_of(exchange(bounded.address, many)) == 431
    assert_serving(bounded.address)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTX/1.1\r\nHost: x\r\n\r\n", 400),
        (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"\r\n" * 20 + b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX(A): 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: x\r\n", 400),  # the head ends before its blank line
    ],
    ids=[
        "http09",
        "double-space",
        "four-parts",
        "bad-version",
        "bad-method",
        "nul-in-target",
        "del-in-target",
        "tls-handshake",
        "http2",
        "only-empty-lines",
        "no-colon",
        "space-before-colon",
        "folding",
        "bad-header-name",
        "cr-in-value",
        "two-hosts",
        "unknown-transfer-coding",
        "cut-head",
    ],
)
def test_malformed_requests_are_refused(bounded: Server, raw: bytes, status: int) -> None:
    answer = exchange(bounded.address, raw, half_close=True)
    assert status_of(answer) == status, answer[:300]
    assert parse_response(answer).header("Connection") == "close"
    assert_serving(bounded.address)


def test_empty_lines_before_a_request_are_ignored(bounded: Server) -> None:
    assert status_of(exchange(bounded.address, b"\r\n\r\nGET / HTTP/1.1\r\n\r\n")) == 200


@pytest.mark.parametrize(
    "length_headers",
    [
        [b"Content-Length: abc"],
        [b"Content-Length: -1"],
        [b"Content-Length: +3"],
        [b"Content-Length: 0x3"],
        [b"Content-Length: 1 2"],
        [b"Content-Length: \xb2"],  # a latin-1 superscript two: str.isdigit() says yes
        [b"Content-Length: 3", b"Content-Length: 4"],
        [b"Content-Length: 3", b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: chunked", b"Content-Length: 3"],
    ],
    ids=[
        "not-digits",
        "negative",
        "plus-sign",
        "hex",
        "two-numbers",
        "superscript-two",
        "two-values",
        "length-then-chunked",
        "chunked-then-length",
    ],
)
def test_bad_body_framing_is_refused(bounded: Server, length_headers: list[bytes]) -> None:
    mark = len(bounded.log())
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in length_headers)
    answer = exchange(bounded.address, raw + b"\r\n3\r\nabc\r\n0\r\n\r\n")
    assert status_of(answer) == 400, answer[:300]
    assert "unexpected error" not in bounded.log()[mark:]
    assert_serving(bounded.address)


def test_same_content_length_twice_is_accepted(bounded: Server) -> None:
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    assert parse_response(exchange(bounded.address, raw)).body.startswith(b"3 ")


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # not hex
        b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",  # int() would take it
        b"-3\r\nabc\r\n0\r\n\r\n",
        b" \r\nabc\r\n0\r\n\r\n",
        b"3\r\nabcXY0\r\n\r\n",  # no CRLF after the data
        b"3\r\nab",  # cut inside a chunk
        b"ffffffffffffffffff\r\nabc\r\n",  # absurd size
    ],
    ids=[
        "not-hex",
        "underscore",
        "negative",
        "blank-size",
        "no-crlf-after-data",
        "cut-in-chunk",
        "absurd-size",
    ],
)
def test_bad_chunked_framing_closes_the_connection(bounded: Server, body: bytes) -> None:
    mark = len(bounded.log())
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    with connect(bounded.address) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)  # nothing more is coming
        answer = read_until_closed(sock)
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:300]
    out = bounded.wait_log("client went away (POST /echo)", since=mark)
    assert "Traceback" not in out
    assert_serving(bounded.address)


# -- the body reader over a real connection (no server process) --


def test_body_reader_over_a_socket_mixes_direct_and_buffered_reads() -> None:
    """What the wsgiref backend does with a request body: the head read through a 64 KiB
    buffered file (so the start of the body is already buffered), then ``wsgi.input``
    read in every way an app may: big reads (taken straight from the socket), small ones
    and lines (through BodyReader's buffer), past the end."""
    from chaussette.backends.wsgiref import _LengthSource
    from chaussette.wsgi import BodyReader

    body = b"".join(
        random.Random(3).randbytes(n) + b"\n" for n in (70_000, 5, 200_000, 0, 9000, 300_000)
    )
    head = b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    a, b = socket.socketpair()
    sender = threading.Thread(target=a.sendall, args=(head + body,))
    sender.start()
    try:
        with b.makefile("rb", buffering=65536) as rfile:
            while rfile.readline() != b"\r\n":
                pass
            reader = BodyReader(_LengthSource(rfile, len(body)))
            got = [reader.read(65536), reader.read(3), reader.readline(), reader.read(100_000)]
            got += [reader.read(8192), reader.readline(), reader.read(1 << 20)]
            assert b"".join(got) == body
            assert [len(x) for x in got[:2]] == [65536, 3]
            assert len(got[3]) == 100_000  # a big read returns all it asked for
            assert reader.read(65536) == b"" and reader.readline() == b""
    finally:
        sender.join(10)
        a.close()
        b.close()


def test_body_reader_keeps_what_a_source_gives_beyond_a_read() -> None:
    """A source may hand over more than asked (read_some's bound is a contract, not
    enforced): a big read returns its size and the rest is kept for the next reads."""
    from chaussette.wsgi import BodyReader

    data = bytes(range(256)) * 400  # 102,400 bytes
    pieces = [data[:50_000], data[50_000:]]  # the second is more than any read asks

    def read_some(n: int) -> bytes:
        return pieces.pop(0) if pieces else b""

    reader = BodyReader(read_some)
    assert reader.read(60_000) == data[:60_000]
    assert reader.read(10) == data[60_000:60_010]
    assert reader.read(40_000) == data[60_010:100_010]
    assert reader.read() == data[100_010:]


def test_body_reader_keeps_what_came_before_an_error() -> None:
    """A big read cut by an error (a timeout, a reset) loses nothing already received:
    an app that catches the error and reads on gets those bytes, as with small reads."""
    from chaussette.wsgi import BodyReader, BodyTruncated

    pieces: list[bytes | None] = [b"a" * 10_000, b"b" * 5_000, None]

    def read_some(n: int) -> bytes:
        piece = pieces.pop(0) if pieces else b""
        if piece is None:
            raise BodyTruncated("client closed with 5000 body bytes unsent")
        return piece

    reader = BodyReader(read_some)
    with pytest.raises(BodyTruncated):
        reader.read(20_000)
    assert reader.read(16_000) == b"a" * 10_000 + b"b" * 5_000
