"""The conformance suite every HTTP backend must pass.

Parametrized over every http backend of ``registry.all_backends()`` — an adapter moved into
``BACKENDS``, or a plugin, is tested without touching this file — and the four ways a
socket reaches chaussette: an inherited TCP fd and an inherited unix fd (the parent binds and
passes them with ``pass_fds``, as a process manager does), a TCP port and a unix path that
chaussette binds itself.

- One chaussette process per (backend, socket kind), shared by the module's tests; the
  SIGTERM tests come last, end it, and check its exit code and its whole log (a test that
  finds it ended gets a fresh one). After every test the new log lines must hold no
  AssertionError, WSGIWarning or "Exception ignored", and no traceback unless the test
  provoked one.
- A backend whose library is not installed is skipped with the package to install; under
  CHAUSSETTE_REQUIRE_PEERS=1 it fails instead.
- What a library truly cannot do is a capability field of its registry entry (``drain``,
  ``keepalive``, ``chunked_input``, ``repeated_headers``, ``unix``), with the reason beside
  it. A test that needs a
  capability is generated only for the backends that have it (``@needs``): nothing here is
  skipped or xfailed for a backend's sake.
- Ordering, not clocks: a streamed or in-flight response is held open by a gate file the test
  creates (``/gate`` of tests/apps/http_app.py), so "X arrived while Y was still running" is
  observed, never timed.
- The app is tests/apps/conf_app.py; a request with ``X-Validate: 1`` goes through
  ``wsgiref.validate.validator`` in the same process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from chaussette.backends import registry
from chaussette.backends.registry import BackendInfo
from tests.apps.http_app import pattern
from tests.conftest import (
    REQUIRE_PEERS,
    Conn,
    HTTPResponse,
    Proc,
    chaussette_cmd,
    dechunk,
    free_port,
    parse_response,
    request_bytes,
    wait_http,
)
from tests.test_wsgiref import _server_socket_for

APP = "tests.apps.conf_app:application"
MiB = 1 << 20
KINDS = ("tcp-fd", "unix-fd", "tcp", "unix")
TCP_KINDS = ("tcp-fd", "tcp")
HTTP_BACKENDS = tuple(b for b in registry.all_backends() if b.protocol == "http")
CASES: dict[str, tuple[BackendInfo, str]] = {
    f"{b.name}-{kind}": (b, kind) for b in HTTP_BACKENDS for kind in KINDS
}
# chaussette's own log lines; anything else at startup is a library talking to the user
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} \[\d+\] \[(\w+)\] ")

F = TypeVar("F", bound=Callable[..., object])


def needs(*capabilities: str, kinds: tuple[str, ...] = KINDS) -> Callable[[F], F]:
    """Generate the test only for backends with these ``BackendInfo`` flags (``"!flag"``:
    without it) and only on these socket kinds."""

    def mark(test: F) -> F:
        test.needs = capabilities  # type: ignore[attr-defined]
        test.kinds = kinds  # type: ignore[attr-defined]
        return test

    return mark


def _has(info: BackendInfo, capability: str) -> bool:
    if capability.startswith("!"):
        return not getattr(info, capability[1:])
    return bool(getattr(info, capability))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" not in metafunc.fixturenames:
        return
    wanted = getattr(metafunc.function, "needs", ())
    kinds = getattr(metafunc.function, "kinds", KINDS)
    ids = [
        case
        for case, (info, kind) in CASES.items()
        if kind in kinds and (kind not in ("unix", "unix-fd") or info.unix)
        if all(_has(info, c) for c in wanted)
    ]
    metafunc.parametrize("server", ids, indirect=True, scope="module")


# -- the servers --


class Running:
    """The chaussette process of one (backend, socket kind); relaunched if a test ended it."""

    def __init__(self, info: BackendInfo, kind: str, sock_dir: Path) -> None:
        self.info, self.kind, self.sock_dir = info, kind, sock_dir
        self.procs: list[Proc] = []
        self.proc: Proc
        self.address: tuple[str, int] | str = ""
        self.startup = ""
        self.errors_expected = False

    def launch(self) -> None:
        n = len(self.procs)
        args = ["--backend", self.info.name, "--graceful-timeout", "10"]
        inherited: socket.socket | None = None
        if self.kind == "tcp-fd":
            inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            inherited.bind(("127.0.0.1", 0))
            self.address = inherited.getsockname()
        elif self.kind == "unix-fd":
            inherited = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.address = str(self.sock_dir / f"fd{n}.sock")
            inherited.bind(self.address)
        elif self.kind == "tcp":
            self.address = ("127.0.0.1", free_port())
            args += ["--port", str(self.address[1])]
        else:
            self.address = str(self.sock_dir / f"own{n}.sock")
            args += ["--host", f"unix:{self.address}"]
        try:
            pass_fds: tuple[int, ...] = ()
            if inherited is not None:
                inherited.listen(128)
                pass_fds = (inherited.fileno(),)
                args += ["--fd", str(inherited.fileno())]
            self.proc = Proc(chaussette_cmd(*args, APP), pass_fds=pass_fds, log_dir=self.sock_dir)
            self.procs.append(self.proc)
        finally:
            if inherited is not None:  # the child has its copy; a manager would keep one
                inherited.close()
        wait_http(self.address, self.proc)
        self.startup = self.log()

    def alive(self) -> bool:
        return self.proc.popen.poll() is None

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

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc._log.close()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Running]:
    info, kind = CASES[request.param]
    missing = info.missing()
    if missing:
        message = f"backend {info.name!r} needs {missing[0]}: {registry.install_hint(info)}"
        if REQUIRE_PEERS:
            pytest.fail(message)
        pytest.skip(message)
    sock_dir = Path(tempfile.mkdtemp(prefix="chs-", dir="/tmp"))
    running = Running(info, kind, sock_dir)
    try:
        running.launch()
        yield running  # the SIGTERM tests, last, end it and check its exit code
    finally:
        running.cleanup()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def srv(server: Running) -> Iterator[Running]:
    """The module's server, alive; after the test its new log lines must be clean."""
    if not server.alive():
        server.launch()
    mark = len(server.log())
    proc = server.proc
    server.errors_expected = False
    yield server
    new = proc.output()[mark:]
    for bad in ("AssertionError", "WSGIWarning", "Exception ignored"):
        assert bad not in new, new
    if not server.errors_expected:
        assert "Traceback" not in new, new


def fetch(srv: Running, method: str, target: str, *headers: str, body: bytes = b"") -> HTTPResponse:
    """One request on a new connection, which the server must then close."""
    with Conn(srv.address) as conn:
        conn.send(request_bytes(method, target, *headers, body=body))
        resp = conn.response(head_only=(method == "HEAD"))
        assert conn.closed_by_server(), "bytes after the response"
    return resp


def environ_of(srv: Running, target: str, *headers: str) -> dict[str, str]:
    resp = fetch(srv, "GET", target, *headers)
    assert resp.status == 200, resp.raw[:500]
    environ: dict[str, str] = json.loads(resp.body)
    return environ


def assert_serving(srv: Running) -> None:
    resp = fetch(srv, "GET", "/")
    assert (resp.status, resp.body) == (200, b"hello")


def body_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    """A chunked body: hex sizes in both cases, one chunk extension, optional trailer."""
    out = [
        b"%x;ext=1\r\n%b\r\n" % (len(p), p) if i == 1 else b"%X\r\n%b\r\n" % (len(p), p)
        for i, p in enumerate(pieces)
    ]
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(data[pos : pos + size])
        pos += size
    return [*pieces, data[pos:]]


def gate_request(gate_dir: Path, name: str = "go", close: bool = True) -> bytes:
    return request_bytes("GET", f"/gate?dir={gate_dir}&name={name}", close=close)


# -- startup, requests, environ --


def test_startup_prints_only_chaussette_lines(srv: Running) -> None:
    lines = [line for line in srv.startup.splitlines() if line.strip()]
    assert lines, "nothing logged at startup"
    for line in lines:
        match = LOG_LINE.match(line)
        assert match, f"library output at startup: {line!r}\n{srv.startup}"
        assert match.group(1) == "INFO", f"{line!r}\n{srv.startup}"


def test_get(srv: Running) -> None:
    resp = fetch(srv, "GET", "/")
    assert (resp.status, resp.body) == (200, b"hello")
    assert resp.header("Content-Length") == "5"


@pytest.mark.parametrize(
    ("target", "length"), [("/", "5"), ("/big", "65536"), ("/stream?n=2&pause=0", None)]
)
def test_head_sends_headers_only(srv: Running, target: str, length: str | None) -> None:
    resp = fetch(srv, "HEAD", target)  # fetch: nothing may follow the head
    assert resp.status == 200
    assert resp.header("Content-Type") == "text/plain"
    if length is not None:
        assert resp.header("Content-Length") == length


def test_query_string_is_raw(srv: Running) -> None:
    env = environ_of(srv, "/env/q?a=%20b&c=%C3%A9&d=x%26y&e")
    assert env["QUERY_STRING"] == "a=%20b&c=%C3%A9&d=x%26y&e"
    assert env["PATH_INFO"] == "/env/q"
    assert env["SCRIPT_NAME"] == ""
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["wsgi.url_scheme"] == "http"


NON_ASCII = "/env/café/ü x"


def test_non_ascii_path_is_latin1_decoded_bytes(srv: Running) -> None:
    env = environ_of(srv, "/env/caf%C3%A9/%C3%BC%20x")
    # PEP 3333: the percent-decoded bytes, as latin-1
    assert env["PATH_INFO"] == NON_ASCII.encode().decode("latin-1")
    assert env["PATH_INFO"].encode("latin-1").decode() == NON_ASCII


def test_raw_utf8_path_is_refused_or_decoded(srv: Running) -> None:
    # unescaped bytes in the request line are invalid (RFC 3986) but sent by some clients:
    # 400 is a fair answer, anything else must be the bytes as latin-1
    target = "/env/café/ü%20x".encode().decode("latin-1")
    resp = fetch(srv, "GET", target)
    assert resp.status in (200, 400), resp.raw[:300]
    if resp.status == 200:
        assert json.loads(resp.body)["PATH_INFO"] == NON_ASCII.encode().decode("latin-1")


@needs("repeated_headers")
def test_repeated_headers_are_joined(srv: Running) -> None:
    env = environ_of(srv, "/env/h", "X-Multi: a", "Accept: text/plain", "X-Multi: b, c")
    assert re.split(r"\s*,\s*", env["HTTP_X_MULTI"]) == ["a", "b", "c"], env["HTTP_X_MULTI"]
    assert env["HTTP_ACCEPT"] == "text/plain"
    assert env["HTTP_HOST"] == "localhost"


# -- request bodies --


def test_post_5mb_read_in_chunks(srv: Running) -> None:
    body = body_of(5 * MiB)
    resp = fetch(srv, "POST", "/echo?chunk=7777", body=body)  # an odd size: no block lines up
    assert (resp.status, resp.body.decode()) == (200, f"{len(body)} {sha(body)}")


def test_post_5mb_read_with_readline(srv: Running) -> None:
    rng = random.Random(4)
    lines = [b"%d %s\n" % (i, b"x" * rng.randrange(200)) for i in range(50_000)]
    body = b"".join(lines) + b"no newline at the end"
    assert len(body) > 5 * MiB
    resp = fetch(srv, "POST", "/lines-sha", body=body)
    assert (resp.status, resp.body.decode()) == (200, f"{len(lines) + 1} {sha(body)}")


@needs("chunked_input")
def test_chunked_request_body(srv: Running) -> None:
    data = body_of(3 * MiB, seed=2)
    pieces = split(data, [1, 10, 4096, 100_000, MiB])
    resp = fetch(
        srv,
        "POST",
        "/echo?chunk=7777",
        "Transfer-Encoding: chunked",
        body=chunked(pieces, trailer=b"X-Checksum: none\r\n"),
    )
    assert (resp.status, resp.body.decode()) == (200, f"{len(data)} {sha(data)}")


# -- responses --


def test_streamed_response_arrives_piece_by_piece(srv: Running, tmp_path: Path) -> None:
    with Conn(srv.address) as conn:
        conn.send(gate_request(tmp_path))
        first = conn.read_until(b"open\n")
        # the generator waits on the gate: its first piece came on its own
        assert b"done" not in first + conn.buf
        (tmp_path / "go").touch()
        resp = parse_response(first + conn.read_to_eof())
    assert (resp.status, resp.body) == (200, b"open\ndone\n")


def test_64k_response(srv: Running) -> None:
    resp = fetch(srv, "GET", "/big")
    assert resp.status == 200
    assert resp.header("Content-Length") == "65536"
    assert resp.body == b"b" * 65536


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/file?size=1000003", b"f" * 1000003),
        ("/file-tail?size=300000&skip=1234", pattern(300000)[1234:]),
        ("/file-nolen?size=200000", pattern(200000)),
    ],
    ids=["with-length", "from-file-position", "without-length"],
)
def test_file_wrapper(srv: Running, target: str, expected: bytes) -> None:
    resp = fetch(srv, "GET", target)
    assert resp.status == 200
    assert resp.body == expected


@needs("keepalive")
def test_keep_alive_serves_several_requests_on_one_connection(srv: Running) -> None:
    post = body_of(100_000, seed=5)
    steps: list[tuple[bytes, bool, Callable[[HTTPResponse], bool]]] = [
        (request_bytes("GET", "/", close=False), False, lambda r: r.body == b"hello"),
        (
            request_bytes("POST", "/echo?chunk=1000", body=post, close=False),
            False,
            lambda r: r.body.decode() == f"{len(post)} {sha(post)}",
        ),
        (request_bytes("GET", "/big", close=False), False, lambda r: r.body == b"b" * 65536),
        (
            request_bytes("HEAD", "/big", close=False),
            True,
            lambda r: r.header("Content-Length") == "65536",
        ),
        (
            request_bytes("GET", "/stream?n=3&pause=0", close=False),
            False,
            lambda r: r.body == b"chunk 0\nchunk 1\nchunk 2\n",
        ),
        (
            request_bytes("GET", "/file-tail?size=100000&skip=7", close=False),
            False,
            lambda r: r.body == pattern(100000)[7:],
        ),
        (request_bytes("GET", "/", close=False), False, lambda r: r.body == b"hello"),
    ]
    with Conn(srv.address) as conn:
        for i, (raw, head_only, check) in enumerate(steps):
            conn.send(raw)
            resp = conn.response(head_only=head_only)
            assert resp.status == 200, (i, resp.raw[:300])
            assert check(resp), (i, resp.raw[:300], resp.body[:300])
            assert (resp.header("Connection") or "").lower() != "close", (i, resp.raw[:300])
        conn.send(request_bytes("GET", "/", close=True))
        assert conn.response().body == b"hello"
        assert conn.closed_by_server()  # and the client's "close" is honoured


@needs("!keepalive")
def test_without_keep_alive_the_server_says_close(srv: Running) -> None:
    with Conn(srv.address) as conn:
        conn.send(request_bytes("GET", "/", "Connection: keep-alive", close=False))
        resp = conn.response()
        assert (resp.status, resp.body) == (200, b"hello")
        assert (resp.header("Connection") or "").lower() == "close"
        assert conn.closed_by_server()


# -- failures --


def test_app_raising_before_start_response_gives_500(srv: Running) -> None:
    srv.errors_expected = True
    mark = len(srv.log())
    resp = fetch(srv, "GET", "/error")
    assert resp.status == 500
    srv.wait_log("boom before start_response", since=mark)  # the error is not swallowed
    assert_serving(srv)


def test_app_raising_mid_stream_cuts_the_connection(srv: Running) -> None:
    srv.errors_expected = True
    mark = len(srv.log())
    with Conn(srv.address) as conn:
        conn.send(request_bytes("GET", "/error-mid", close=False))
        head = parse_response(conn.read_until(b"\r\n\r\n"), head_only=True)
        # no "Connection: close" was asked: only the server closing ends this read
        rest = conn.read_to_eof()
    assert head.status == 200
    assert b"first part" in rest
    # the app gave no length: chunked, so that a cut is visible (no last chunk)
    assert (head.header("Transfer-Encoding") or "").lower() == "chunked", head.raw
    with pytest.raises(AssertionError, match="cut"):
        dechunk(rest)
    srv.wait_log("boom mid-stream", since=mark)
    assert_serving(srv)


def test_client_disconnect_calls_close(srv: Running, tmp_path: Path) -> None:
    srv.errors_expected = True  # a library may log the broken connection
    marker = tmp_path / "closed"
    with Conn(srv.address) as conn:
        conn.send(request_bytes("GET", f"/closed?marker={marker}&n=1000&pause=0.005"))
        conn.read_until(b"\r\n\r\n")
        for _ in range(1000):
            if len(conn.buf) >= 200_000:
                break
            assert conn.more(), "closed early"
        assert not marker.exists()  # still streaming when the client leaves
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the iterable's close() was not called"
    assert marker.read_text() == "closed"
    assert_serving(srv)


def test_slow_client_does_not_delay_others(srv: Running) -> None:
    size = 32 * MiB
    with Conn(srv.address) as slow:
        slow.send(request_bytes("GET", f"/big?size={size}"))
        slow.read_until(b"\r\n\r\n")
        # The slowest client: it stops reading. The kernel buffers of both ends hold a few
        # MiB at most, so the server is now blocked on it with most of the body still to
        # send. Someone else is served meanwhile:
        assert slow.received < MiB
        assert_serving(srv)
        body = slow.read_to_eof()
    assert len(body) == size
    assert body.count(b"b") == size


# -- PEP 3333, checked by wsgiref.validate --


def test_validator_finds_nothing(srv: Running) -> None:
    mark = len(srv.log())
    v = "X-Validate: 1"
    post = body_of(300_000, seed=6)
    lines = b"".join(b"line %d\n" % i for i in range(5000)) + b"tail"
    assert fetch(srv, "GET", "/", v).body == b"hello"
    assert fetch(srv, "HEAD", "/big", v).header("Content-Length") == "65536"
    env = environ_of(srv, "/env/v?a=%20b", v, "X-Multi: 1", "X-Multi: 2")
    assert env["QUERY_STRING"] == "a=%20b"
    resp = fetch(srv, "POST", "/echo?chunk=1000", v, "Content-Type: x/y", body=post)
    assert resp.body.decode() == f"{len(post)} {sha(post)}"
    assert fetch(srv, "POST", "/lines-sha", v, body=lines).body.decode() == f"5001 {sha(lines)}"
    if srv.info.chunked_input:
        data = body_of(200_000, seed=7)
        resp = fetch(
            srv,
            "POST",
            "/echo",
            v,
            "Transfer-Encoding: chunked",
            body=chunked(split(data, [1, 5000])),
        )
        assert resp.body.decode() == f"{len(data)} {sha(data)}"
    resp = fetch(srv, "GET", "/stream?n=3&pause=0", v)
    assert resp.body == b"chunk 0\nchunk 1\nchunk 2\n"
    assert fetch(srv, "GET", "/file?size=100000", v).body == b"f" * 100000
    assert fetch(srv, "GET", "/file-nolen?size=5000", v).body == pattern(5000)
    assert fetch(srv, "GET", "/nowhere", v).status == 404
    if srv.info.keepalive:
        with Conn(srv.address) as conn:
            for _ in range(3):
                conn.send(request_bytes("GET", "/big", v, close=False))
                assert conn.response().body == b"b" * 65536
    out = srv.log()[mark:]
    assert "AssertionError" not in out and "WSGIWarning" not in out, out


# -- the server's own sockets and signals --


@needs(kinds=TCP_KINDS)
def test_tcp_nodelay_on_accepted_connections(srv: Running, tmp_path: Path) -> None:
    with Conn(srv.address) as conn:
        conn.send(gate_request(tmp_path))
        first = conn.read_until(b"open\n")  # the server's end is open and in use
        server_end = _server_socket_for(srv.proc.pid, conn.sock)
        assert server_end is not None, "no socket of the server is connected to us"
        with server_end:
            assert server_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        (tmp_path / "go").touch()
        assert parse_response(first + conn.read_to_eof()).body == b"open\ndone\n"


@needs("drain")
def test_sigterm_lets_the_request_in_flight_finish(srv: Running, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        idle = None
        if srv.info.keepalive:  # an idle keep-alive connection must not hold the drain
            idle = stack.enter_context(Conn(srv.address))
            idle.send(request_bytes("GET", "/", close=False))
            assert idle.response().body == b"hello"
        busy = stack.enter_context(Conn(srv.address))
        busy.send(gate_request(tmp_path, close=False))
        first = busy.read_until(b"open\n")
        mark = len(srv.log())
        srv.proc.send(signal.SIGTERM)
        srv.wait_log("SIGTERM: stopping", since=mark)
        if idle is not None:
            assert idle.closed_by_server()  # at once, while the other request is in flight
        assert srv.alive(), "exited with a request in flight:\n" + srv.log()
        (tmp_path / "go").touch()
        resp = parse_response(first + busy.read_to_eof())
        assert (resp.status, resp.body) == (200, b"open\ndone\n")
    assert srv.proc.wait(15) == 0, srv.log()
    assert "all requests finished" in srv.log()
    assert_clean_log(srv.log())


@needs("!drain")
def test_sigterm_when_idle_exits_0(srv: Running) -> None:
    srv.proc.send(signal.SIGTERM)
    assert srv.proc.wait(15) == 0, srv.log()
    assert_clean_log(srv.log())


def assert_clean_log(whole: str) -> None:
    """Nothing in the whole log of a process, even what came late (e.g. from a
    garbage-collected iterable that the validator saw unclosed)."""
    for bad in ("AssertionError", "WSGIWarning", "Exception ignored"):
        assert bad not in whole, whole
