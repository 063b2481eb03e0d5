"""What is particular to ``--backend eventlet``, against real chaussette processes.

The HTTP behaviour every backend shares is in tests/test_http_backends.py; here: the green
pool bound (--spawn), monkey-patching and --no-monkey, signals while the hub serves, the
access log, a restart in place, unix socket addresses, the idle timeout.

Ordering, not clocks: an in-flight response is held open by a gate file (``/gate`` of
tests/apps/http_app.py). "Not answered" is checked by waiting a short, bounded time for
bytes that must not come.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import (
    Proc,
    free_port,
    parse_response,
    read_until,
    read_until_closed,
    require_module,
    wait_http,
)

require_module("eventlet", "pip install 'chaussette[eventlet]'")

APP = "tests.apps.http_app:application"
QUIET = 0.5  # seconds a connection must stay silent to count as "not answered"


def start(procs, *args: str, address: tuple[str, int] | str | None = None) -> tuple[Proc, object]:
    if address is None:
        address = ("127.0.0.1", free_port())
    where = (
        ["--host", f"unix:{address}"] if isinstance(address, str) else ["--port", str(address[1])]
    )
    proc = procs.chaussette("--backend", "eventlet", *where, *args, APP)
    wait_http(address, proc)
    return proc, address


def connect(address: tuple[str, int] | str, timeout: float = 10) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def send_get(sock: socket.socket, target: str, close: bool = True) -> None:
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())


def silent(sock: socket.socket, seconds: float = QUIET) -> bool:
    """True when nothing arrives (and the connection is not closed) for ``seconds``."""
    return not select.select([sock], [], [], seconds)[0]


def open_gate(sock: socket.socket, gate_dir: Path, name: str) -> bytes:
    """Start a /gate request; returns the bytes read so far ("open" has arrived)."""
    send_get(sock, f"/gate?dir={gate_dir}&name={name}")
    return read_until(sock, b"open\n")


def finish(sock: socket.socket, first: bytes) -> bytes:
    resp = parse_response(first + read_until_closed(sock))
    assert resp.status == 200
    return resp.body


# -- the pool --


def test_spawn_bounds_the_connections_served_at_once(procs, tmp_path: Path) -> None:
    _, address = start(procs, "--spawn", "2")
    with connect(address) as a, connect(address) as b, connect(address) as c:
        first_a = open_gate(a, tmp_path, "a")
        first_b = open_gate(b, tmp_path, "b")
        send_get(c, "/")
        assert silent(c), "a third connection was served with --spawn 2"
        (tmp_path / "a").touch()
        assert finish(a, first_a) == b"open\ndone\n"
        resp = parse_response(read_until_closed(c))  # a slot is free: c is served now
        assert (resp.status, resp.body) == (200, b"hello")
        (tmp_path / "b").touch()
        assert finish(b, first_b) == b"open\ndone\n"


# -- monkey-patching --


def test_monkey_patched_sleep_lets_others_be_served(procs, tmp_path: Path) -> None:
    _, address = start(procs)
    with connect(address) as gated, connect(address) as other:
        first = open_gate(gated, tmp_path, "go")  # the app sleeps in a loop on the gate
        send_get(other, "/")
        resp = parse_response(read_until_closed(other))
        assert (resp.status, resp.body) == (200, b"hello")
        (tmp_path / "go").touch()
        assert finish(gated, first) == b"open\ndone\n"


def test_no_monkey_serves_and_a_blocking_app_blocks_the_hub(procs, tmp_path: Path) -> None:
    _, address = start(procs, "--no-monkey")  # wait_http: the hub runs while main waits
    with connect(address) as gated, connect(address) as other:
        first = open_gate(gated, tmp_path, "go")  # time.sleep is the real one now
        send_get(other, "/")
        assert silent(other), "answered while the app blocked the only thread"
        (tmp_path / "go").touch()
        assert finish(gated, first) == b"open\ndone\n"
        resp = parse_response(read_until_closed(other))
        assert (resp.status, resp.body) == (200, b"hello")


@pytest.mark.parametrize("monkey", [True, False], ids=["monkey", "no-monkey"])
def test_sigterm_drains_while_the_hub_serves(procs, monkey: bool) -> None:
    """In flight: an upload half sent, waiting on the server's green socket (cooperative
    with or without monkey-patching). Idle: a keep-alive connection between requests."""
    proc, address = start(procs, *([] if monkey else ["--no-monkey"]))
    body = os.urandom(200_000)
    head = (
        f"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with connect(address) as idle, connect(address) as busy:
        send_get(idle, "/", close=False)
        assert b"hello" in read_until(idle, b"hello")
        busy.sendall(head + body[:1000])
        proc.send(signal.SIGTERM)
        proc.wait_for_output("SIGTERM: stopping", timeout=10)
        assert read_until_closed(idle) == b"", "the idle keep-alive connection was not closed"
        assert proc.popen.poll() is None, "exited with a request in flight"
        busy.sendall(body[1000:])
        resp = parse_response(read_until_closed(busy))
        assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
    assert proc.wait(15) == 0, proc.output()
    assert "all requests finished" in proc.output()


def test_sighup_restarts_in_place(procs) -> None:
    proc, address = start(procs)
    before = len(proc.output())
    proc.send(signal.SIGHUP)
    proc.wait_for_output("re-executing", timeout=10)
    assert "SIGHUP: restarting in place" in proc.output()[before:]
    # the same pid serves again, monkey-patched again in the new image
    wait_http(address, proc)
    assert proc.output().count("serving tests.apps.http_app") == 2
    resp = parse_response(_raw_get(address, "/pid"))
    assert resp.body == str(proc.pid).encode()


def _raw_get(address: tuple[str, int] | str, target: str) -> bytes:
    with connect(address) as sock:
        send_get(sock, target)
        return read_until_closed(sock)


# -- logs --


def test_access_log_only_when_asked(procs) -> None:
    quiet, address = start(procs)
    _raw_get(address, "/?quiet=1")
    loud, loud_address = start(procs, "--access-log", "-")
    _raw_get(loud_address, "/?loud=1")
    loud.wait_for_output('"GET /?loud=1 HTTP/1.1" 200')
    assert "/?quiet=1" not in quiet.output()


def test_startup_is_quiet_and_the_deprecation_warning_is_not_shown(procs) -> None:
    proc, _ = start(procs)
    out = proc.output()
    assert "deprecated" not in out.lower(), out
    assert out.count("\n") == 1, out  # the one "serving ..." line


# -- sockets --


def test_unix_socket_environ_names_the_socket(procs, short_tmp: Path) -> None:
    path = str(short_tmp / "e.sock")
    _, address = start(procs, address=path)
    env = json.loads(parse_response(_raw_get(address, "/environ")).body)
    assert env["REMOTE_ADDR"] == path
    assert env["SERVER_NAME"] == "localhost"  # the Host header
    assert "REMOTE_PORT" not in env


def test_tcp_environ(procs) -> None:
    _, address = start(procs)
    with connect(address) as sock:
        send_get(sock, "/environ?x=1")
        env = json.loads(parse_response(read_until_closed(sock)).body)
        assert env["REMOTE_PORT"] == str(sock.getsockname()[1])
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["SERVER_PORT"] == str(address[1])
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["QUERY_STRING"] == "x=1"
    assert "CONTENT_TYPE" not in env  # the client sent none
    assert "headers_raw" not in env


def test_idle_connection_closed_after_timeout(procs) -> None:
    _, address = start(procs, "--timeout", "1")
    with connect(address) as sock:
        send_get(sock, "/", close=False)
        assert b"hello" in read_until(sock, b"hello")
        assert read_until_closed(sock) == b""  # the 10 s socket timeout bounds this wait


@pytest.mark.parametrize(
    "partial",
    [
        b"GET / HTTP/1.1\r\nHost: x",  # a request head that stops half way
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-some",  # a body
    ],
    ids=["half-head", "half-body"],
)
def test_silent_client_cut_after_timeout_others_served(procs, partial: bytes) -> None:
    """--timeout is enforced by a reaper, not by per-read timers: a client that stops
    sending mid-request is cut, and others are served meanwhile."""
    _, address = start(procs, "--timeout", "1")
    with connect(address) as stalled:
        stalled.sendall(partial)
        with connect(address) as other:
            send_get(other, "/")
            assert parse_response(read_until_closed(other)).status == 200
        data = read_until_closed(stalled)  # the 10 s socket timeout bounds this wait
    assert b"200 OK" not in data  # cut (or a 4xx), never served as if complete


def test_serves_from_the_main_thread_alone(procs) -> None:
    """The hub runs in the main thread, which waits for signals in it: no helper thread."""
    proc, _ = start(procs)
    tasks = os.listdir(f"/proc/{proc.pid}/task")
    assert len(tasks) == 1, tasks


# 404: the request reached the app (which has no such route); 414: it did not
@pytest.mark.parametrize(("length", "status"), [(100, 404), (101, 414)])
def test_limit_request_line(procs, length: int, status: int) -> None:
    _, address = start(procs, "--limit-request-line", "100")
    target = "/" + "a" * (length - len("GET / HTTP/1.1"))
    line = f"GET {target} HTTP/1.1"
    assert len(line) == length
    with connect(address) as sock:
        sock.sendall(line.encode() + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert parse_response(read_until_closed(sock)).status == status
