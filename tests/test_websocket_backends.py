"""The websocket backends (geventwebsocket, geventws4py, socketio) against real chaussette
processes and real clients: the ``websockets`` package, python-socketio's client and raw
HTTP.

The HTTP side of these backends is the conformance suite's (tests/test_http_backends.py);
here is what a websocket adds: echo of text, binary and 1 MiB messages, the close codes
each side sees (1000 for a normal close both ways, the app's own code, 1011 when the app
raised, 1001 when the server drains), websockets counted in the --spawn pool, no --timeout
once upgraded, and socket.io over websocket and over polling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import socketio
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect, unix_connect

from chaussette.backends import registry
from tests.conftest import (
    REQUIRE_PEERS,
    HTTPResponse,
    Proc,
    error_line,
    free_port,
    http_request,
    parse_response,
    read_all,
    run_chaussette,
    wait_http,
)
from tests.conftest import connect as raw_connect
from tests.test_wsgiref import _server_socket_for

MiB = 1 << 20
WS_BACKENDS = ("geventwebsocket", "geventws4py", "socketio")
ECHO_APPS = {
    "geventwebsocket": "tests.apps.ws_echo:application",
    "geventws4py": "tests.apps.ws_ws4py:application",
    "socketio": "tests.apps.ws_echo:application",  # the socketio backend serves any app
}
SIO_APP = "tests.apps.ws_socketio:application"


def _require(backend: str) -> None:
    missing = registry.lookup("http", backend).missing()
    if missing:
        info = registry.lookup("http", backend)
        message = f"backend {backend!r} needs {missing[0]}: {registry.install_hint(info)}"
        if REQUIRE_PEERS:
            pytest.fail(message)
        pytest.skip(message)


class Served:
    def __init__(self, proc: Proc, address: tuple[str, int] | str) -> None:
        self.proc = proc
        self.address = address

    def url(self, scheme: str = "http", path: str = "") -> str:
        assert isinstance(self.address, tuple)
        return f"{scheme}://{self.address[0]}:{self.address[1]}{path}"

    def log(self) -> str:
        return self.proc.output()

    def wait_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not in the log:\n{self.log()}"
            time.sleep(0.02)


@pytest.fixture
def serve(procs, short_tmp: Path):
    """``serve(backend, *args, app=..., kind=...)``: a chaussette serving on a TCP port it
    binds (``tcp``), a unix path it binds (``unix``) or an inherited unix fd (``unix-fd``)."""

    def start(backend: str, *args: str, app: str | None = None, kind: str = "tcp") -> Served:
        _require(backend)
        app = app or ECHO_APPS[backend]
        inherited = None
        address: tuple[str, int] | str
        if kind == "tcp":
            address = ("127.0.0.1", free_port())
            args = (*args, "--port", str(address[1]))
        elif kind == "unix":
            address = str(short_tmp / f"{backend}.sock")
            args = (*args, "--host", f"unix:{address}")
        else:
            address = str(short_tmp / f"{backend}-fd.sock")
            inherited = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            inherited.bind(address)
            inherited.listen(64)
            args = (*args, "--fd", str(inherited.fileno()))
        try:
            pass_fds = () if inherited is None else (inherited.fileno(),)
            proc = procs.chaussette("--backend", backend, *args, app, pass_fds=pass_fds)
        finally:
            if inherited is not None:
                inherited.close()
        wait_http(address, proc)
        return Served(proc, address)

    return start


def ws_connect(address: tuple[str, int] | str, path: str = "/ws") -> ClientConnection:
    options = {"max_size": 4 * MiB, "open_timeout": 10, "close_timeout": 10}
    if isinstance(address, str):
        return unix_connect(address, f"ws://localhost{path}", **options)
    return connect(f"ws://{address[0]}:{address[1]}{path}", **options)


def closed_by_server(ws: ClientConnection, timeout: float = 10) -> tuple[int, str]:
    """Wait for the server's close frame; its code and reason."""
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=timeout)
    assert info.value.rcvd is not None, f"no close frame from the server: {info.value}"
    return info.value.rcvd.code, info.value.rcvd.reason


def close_handshake(ws: ClientConnection, reason: str = "") -> tuple[int, str]:
    """Close with 1000 from the client; the code and reason of the server's answer."""
    ws.close(1000, reason)
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None, "the server did not answer the close frame"
    return rcvd.code, rcvd.reason


def read_framed(sock: socket.socket) -> HTTPResponse:
    """One response, read by its framing."""
    data = b""
    while True:
        try:
            return parse_response(data)
        except AssertionError:  # incomplete so far
            chunk = sock.recv(65536)
            if not chunk:
                return parse_response(data)
            data += chunk


def echo(ws: ClientConnection, message: str | bytes) -> None:
    ws.send(message)
    assert ws.recv(timeout=10) == message


# -- websockets --


@pytest.mark.parametrize("backend", WS_BACKENDS)
def test_echo_and_http_on_one_server(serve, backend):
    srv = serve(backend, "--access-log", "-")
    big = os.urandom(MiB)
    with ws_connect(srv.address) as ws:
        echo(ws, "hello")
        echo(ws, "héllo wörld ✓")
        echo(ws, b"\x00\x01\x02\xff")
        echo(ws, big)
        echo(ws, "é" * (MiB // 2))  # 1 MiB of UTF-8 text
        echo(ws, b"")
        assert close_handshake(ws, "done") == (1000, "done")
    # plain HTTP on the same server, before and after
    assert http_request(srv.address, "/").body == b"hello"
    body = os.urandom(100_000)
    answer = http_request(srv.address, "/echo", "POST", body).body.decode()
    assert answer.split()[0] == str(len(body))
    srv.wait_log('"GET /ws HTTP/1.1" 101')
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("backend", WS_BACKENDS)
@pytest.mark.parametrize("kind", ["unix", "unix-fd"])
def test_unix_socket_with_concurrent_websockets(serve, backend, kind):
    """Every client of a unix socket has the same (empty) address: gevent-websocket keyed its
    registry of live websockets by it, so the second one to end raised KeyError."""
    srv = serve(backend, kind=kind)
    with ws_connect(srv.address) as first, ws_connect(srv.address) as second:
        echo(first, "one")
        echo(second, "two")
        assert close_handshake(first) == (1000, "")
        echo(second, b"still here")
        assert close_handshake(second) == (1000, "")
    assert http_request(srv.address, "/").body == b"hello"
    with ws_connect(srv.address) as third:
        echo(third, "three")
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("backend", WS_BACKENDS)
def test_server_side_close_codes(serve, backend):
    srv = serve(backend)
    with ws_connect(srv.address) as ws:
        echo(ws, "x")
        ws.send("bye")  # the app ends (or, ws4py, closes with its default)
        assert closed_by_server(ws) == (1000, "")
    with ws_connect(srv.address) as ws:
        ws.send("close:4001")
        assert closed_by_server(ws) == (4001, "by app")
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("backend", WS_BACKENDS)
def test_app_error_closes_with_1011(serve, backend):
    srv = serve(backend)
    with ws_connect(srv.address) as ws:
        echo(ws, "before")
        ws.send("raise")
        code, _ = closed_by_server(ws)
        assert code == 1011
    srv.wait_log("boom inside a websocket")
    with ws_connect(srv.address) as ws:
        echo(ws, "after")


@pytest.mark.parametrize("backend", WS_BACKENDS)
def test_bad_handshake_is_a_400(serve, backend):
    srv = serve(backend)
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "99",
    }
    request = "GET /ws HTTP/1.1\r\nHost: x\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    with raw_connect(srv.address) as sock:
        sock.sendall(request.encode() + b"\r\n")
        response = read_framed(sock)  # the connection may stay open (keep-alive)
    assert response.status == 400
    assert response.body  # says why
    with ws_connect(srv.address) as ws:
        echo(ws, "fine")
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("backend", WS_BACKENDS)
def test_sigterm_closes_websockets_with_1001_and_exits_0(serve, backend):
    """A drain tells open websockets to go away: without it they would hold it for the
    whole graceful timeout and the exit would be 1 (requests cut)."""
    srv = serve(backend, "--graceful-timeout", "20")
    with ws_connect(srv.address) as ws, ws_connect(srv.address) as other:
        echo(ws, "x")
        echo(other, "y")
        srv.proc.send(signal.SIGTERM)
        assert closed_by_server(ws, timeout=15) == (1001, "server shutting down")
        assert closed_by_server(other, timeout=15)[0] == 1001
    assert srv.proc.wait(20) == 0, srv.log()
    assert "all requests finished" in srv.log()


@pytest.mark.parametrize("backend", ["geventwebsocket", "geventws4py"])
def test_drain_cuts_a_peer_that_never_answers_the_close_frame(serve, backend):
    """A peer that vanished cannot answer 1001: after --timeout its connection is cut
    and the drain ends in time (exit 0), not at the graceful timeout (exit 1)."""
    srv = serve(backend, "--timeout", "1", "--graceful-timeout", "20")
    with raw_connect(srv.address) as mute:
        mute.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = mute.recv(1)
            assert data, head
            head += data
        assert head.startswith(b"HTTP/1.1 101 "), head
        srv.proc.send(signal.SIGTERM)
        assert srv.proc.wait(20) == 0, srv.log()  # the client never read nor answered
    assert "did not answer the close frame" in srv.log()


@pytest.mark.parametrize("backend", WS_BACKENDS)
def test_sighup_tells_websockets_to_go_away_and_restarts(serve, backend):
    srv = serve(backend)
    pid = http_request(srv.address, "/pid").body
    with ws_connect(srv.address) as ws:
        echo(ws, "before")
        srv.proc.send(signal.SIGHUP)
        assert closed_by_server(ws) == (1001, "server shutting down")
    with ws_connect(srv.address) as ws:  # waits in the listen queue while it restarts
        echo(ws, "after")
        assert close_handshake(ws) == (1000, "")
    srv.wait_log("re-executing")
    assert http_request(srv.address, "/pid").body == pid
    assert srv.proc.popen.poll() is None


@pytest.mark.parametrize("backend", WS_BACKENDS)
def test_silent_websocket_outlives_timeout(serve, backend):
    """--timeout bounds a silent HTTP client; a websocket may rightly stay silent, and TCP
    keep-alive probes are what find a vanished peer."""
    srv = serve(backend, "--timeout", "1")
    with ws_connect(srv.address) as ws:
        echo(ws, "a")
        server_end = _server_socket_for(srv.proc.pid, ws.socket)
        assert server_end is not None
        with server_end:
            assert server_end.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert server_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        time.sleep(1.5)  # silent for longer than --timeout
        echo(ws, "b")
        assert close_handshake(ws) == (1000, "")


@pytest.mark.parametrize("backend", WS_BACKENDS)
def test_websockets_fill_the_spawn_pool(serve, backend):
    """A websocket is served in its connection's greenlet, from the --spawn pool (ws4py's
    own gevent server ran them in a second, unbounded pool). Also without monkey-patching."""
    srv = serve(backend, "--spawn", "2", "--no-monkey")
    with ws_connect(srv.address) as first, ws_connect(srv.address) as second:
        echo(first, "1")
        echo(second, "2")
        with raw_connect(srv.address) as waiting:
            waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            waiting.settimeout(0.5)
            with pytest.raises(TimeoutError):
                waiting.recv(1)  # the pool is full: the request waits in the listen queue
            assert close_handshake(first) == (1000, "")
            waiting.settimeout(10)
            assert parse_response(read_all(waiting)).body == b"hello"
        echo(second, "3")


# -- socket.io --


@contextlib.contextmanager
def sio_client(srv: Served, transports: list[str] | None) -> Iterator[socketio.Client]:
    client = socketio.Client(reconnection=False)
    client.connect(srv.url(), transports=transports, wait_timeout=10)
    try:
        yield client
    finally:
        client.disconnect()
        # python-engineio's client leaves its websocket open when the server closed it
        transport = getattr(client.eio, "ws", None)
        if transport is not None:
            transport.shutdown()


def _wait_body(srv: Served, path: str, expected: bytes) -> None:
    deadline = time.monotonic() + 10
    while (body := http_request(srv.address, path).body) != expected:
        assert time.monotonic() < deadline, f"{path}: {body!r}, expected {expected!r}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("transports", "expected"),
    [(["websocket"], "websocket"), (["polling"], "polling"), (None, "websocket")],
    ids=["websocket", "polling", "upgrade"],
)
def test_socketio_emit_and_reply(serve, transports, expected):
    srv = serve("socketio", app=SIO_APP)
    # engineio picks eventlet first when it is installed; the backend makes gevent the default
    assert http_request(srv.address, "/sio-mode").body == b"gevent"
    shouted = threading.Event()
    received: list[str] = []
    with sio_client(srv, transports) as client:

        @client.on("shouted")
        def on_shouted(data):
            received.append(data)
            shouted.set()

        assert client.call("echo", {"n": 1, "text": "héllo"}, timeout=10) == {
            "n": 1,
            "text": "héllo",
        }
        client.emit("shout", "hey")
        assert shouted.wait(10)
        assert received == ["HEY"]
        if expected == "websocket" and transports is None:
            deadline = time.monotonic() + 10  # the upgrade follows the first poll
            while client.transport() != "websocket":
                assert time.monotonic() < deadline, "never upgraded to websocket"
                time.sleep(0.05)
        assert client.transport() == expected
        assert http_request(srv.address, "/sio-clients").body == b"1"
    _wait_body(srv, "/sio-clients", b"0")
    assert http_request(srv.address, "/").body == b"hello"
    assert "Traceback" not in srv.log()


def test_socketio_sigterm_ends_both_transports_and_exits_0(serve):
    """A drain closes websocket transports with 1001 and answers long-polls in flight at
    once; otherwise a polling client would hold it until the next ping (25 s), longer than
    this graceful timeout, and the exit would be 1."""
    srv = serve("socketio", "--graceful-timeout", "20", app=SIO_APP)
    with sio_client(srv, ["websocket"]) as ws_client, sio_client(srv, ["polling"]) as poller:
        assert ws_client.call("echo", "w", timeout=10) == "w"
        assert poller.call("echo", "p", timeout=10) == "p"
        _wait_body(srv, "/sio-clients", b"2")
        srv.proc.send(signal.SIGTERM)
        assert srv.proc.wait(20) == 0, srv.log()
        deadline = time.monotonic() + 10
        while ws_client.connected or poller.connected:
            assert time.monotonic() < deadline, "a client still thinks it is connected"
            time.sleep(0.05)
    assert "all requests finished" in srv.log()


def test_socketio_refuses_another_async_mode():
    _require("socketio")
    code, out = run_chaussette(
        "--backend",
        "socketio",
        "--port",
        str(free_port()),
        "tests.apps.ws_socketio:make('threading')",
    )
    assert code == 2, out
    line = error_line(out)
    assert "async_mode='threading'" in line and "async_mode='gevent'" in line, line
