"""What is particular to ``--backend bjoern``, against real chaussette processes.

The HTTP behaviour every backend shares is in tests/test_http_backends.py; here: how a
stop goes with bjoern's one C loop (in-flight responses finish, idle connections close after
them, SIGINT ignored meanwhile), SIGINT taken back from libev, a restart in place, what the
adapter's thin wrapper fixes (HEAD, addresses, access log, tracebacks into the log).

Ordering, not clocks: an in-flight response is held open by a gate file (``/gate`` of
tests/apps/http_app.py); while its generator waits, bjoern's only thread is busy.
"""

from __future__ import annotations

import json
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

require_module("bjoern", "apt-get install libev-dev; pip install 'chaussette[bjoern]'")

APP = "tests.apps.http_app:application"
QUIET = 0.5  # seconds a process must stay up, or a connection silent, to count as such
MiB = 1 << 20


def start(procs, *args: str, address: tuple[str, int] | str | None = None) -> tuple[Proc, object]:
    if address is None:
        address = ("127.0.0.1", free_port())
    if isinstance(address, str):
        where = ["--host", f"unix:{address}"]
    else:
        where = ["--host", address[0], "--port", str(address[1])]
    proc = procs.chaussette("--backend", "bjoern", *where, *args, APP)
    wait_http(address, proc)
    return proc, address


def connect(address: tuple[str, int] | str, timeout: float = 10, rcvbuf: int = 0) -> socket.socket:
    if isinstance(address, str):
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def send(sock: socket.socket, method: str, target: str, close: bool = True) -> None:
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())


def get(address: tuple[str, int] | str, target: str) -> bytes:
    with connect(address) as sock:
        send(sock, "GET", target)
        return read_until_closed(sock)


def still_running(proc: Proc, seconds: float = QUIET) -> bool:
    try:
        proc.wait(seconds)
    except Exception:  # subprocess.TimeoutExpired
        return True
    return False


def gate(sock: socket.socket, gate_dir: Path, close: bool = True) -> bytes:
    send(sock, "GET", f"/gate?dir={gate_dir}&name=go", close=close)
    return read_until(sock, b"open\n")


# -- stopping --


def test_sigterm_finishes_the_response_in_flight_then_closes_idle_ones(
    procs, tmp_path: Path
) -> None:
    proc, address = start(procs)
    with connect(address) as idle, connect(address) as busy:
        send(idle, "GET", "/", close=False)
        assert b"hello" in read_until(idle, b"hello")
        first = gate(busy, tmp_path)  # bjoern's one thread now waits in the app
        proc.send(signal.SIGTERM)
        proc.wait_for_output("SIGTERM: stopping")
        assert still_running(proc), "exited with a response in flight:\n" + proc.output()
        (tmp_path / "go").touch()
        resp = parse_response(first + read_until_closed(busy))
        assert (resp.status, resp.body) == (200, b"open\ndone\n")
        assert read_until_closed(idle) == b""  # closed once the loop was free, not held open
    assert proc.wait(15) == 0, proc.output()
    assert "all requests finished" in proc.output()


def test_sigterm_lets_a_slow_download_finish(procs) -> None:
    proc, address = start(procs)
    size = 32 * MiB
    with connect(address, rcvbuf=65536) as slow:
        send(slow, "GET", f"/big?size={size}")
        head = read_until(slow, b"\r\n\r\n")
        proc.send(signal.SIGTERM)
        proc.wait_for_output("SIGTERM: stopping")
        assert still_running(proc), "exited while a response was being written"
        resp = parse_response(head + read_until_closed(slow))
    assert len(resp.body) == size and resp.body.count(b"b") == size
    assert proc.wait(15) == 0, proc.output()


def test_sigint_reaches_the_lifecycle_not_libev(procs) -> None:
    """libev's SIGINT handler would only stop bjoern accepting, and then wait for the idle
    connection forever; the lifecycle stops the process and closes that connection."""
    proc, address = start(procs)
    with connect(address) as idle:
        send(idle, "GET", "/", close=False)
        assert b"hello" in read_until(idle, b"hello")
        proc.send(signal.SIGINT)
        proc.wait_for_output("SIGINT: stopping")
        assert read_until_closed(idle) == b""
    assert proc.wait(15) == 0, proc.output()
    assert "all requests finished" in proc.output()


def test_during_a_stop_sigint_is_ignored_and_sigquit_exits_at_once(procs, tmp_path: Path) -> None:
    proc, address = start(procs)
    with connect(address) as busy:
        gate(busy, tmp_path)
        proc.send(signal.SIGTERM)
        proc.wait_for_output("SIGTERM: stopping")
        proc.send(signal.SIGINT)  # bjoern's loop would turn its end into one: ignored
        assert still_running(proc), proc.output()
        proc.send(signal.SIGQUIT)
        assert proc.wait(15) == 1, proc.output()  # a response was cut
    assert "exiting now" in proc.output()


def test_sighup_restarts_in_place(procs, tmp_path: Path) -> None:
    """The restart drains (bjoern's loop ends meanwhile, and the interrupt it raises then
    must not turn the restart into a stop), then re-executes with the same pid."""
    proc, address = start(procs)
    mark = len(proc.output())
    with connect(address) as idle, connect(address) as busy:
        send(idle, "GET", "/", close=False)
        assert b"hello" in read_until(idle, b"hello")
        first = gate(busy, tmp_path)
        proc.send(signal.SIGHUP)
        proc.wait_for_output("SIGHUP: restarting in place")
        (tmp_path / "go").touch()
        assert parse_response(first + read_until_closed(busy)).body == b"open\ndone\n"
        assert read_until_closed(idle) == b""
    proc.wait_for_output("re-executing")
    wait_http(address, proc)
    assert "stopping instead" not in proc.output()[mark:]
    assert parse_response(get(address, "/pid")).body == str(proc.pid).encode()
    proc.send(signal.SIGINT)  # taken back from libev in the new image too
    assert proc.wait(15) == 0, proc.output()


# -- the wrapper --


def test_head_without_length_on_keep_alive(procs) -> None:
    _, address = start(procs)
    with connect(address) as sock:
        send(sock, "HEAD", "/stream?n=3&pause=0", close=False)
        head = read_until(sock, b"\r\n\r\n")
        resp = parse_response(head, head_only=True)
        assert resp.header("Content-Length") == "24"  # what GET sends: 3 x "chunk N\n"
        assert resp.header("Transfer-Encoding") is None
        send(sock, "GET", "/")  # nothing may sit between the two responses
        rest = read_until_closed(sock)
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:100]
    assert parse_response(rest).body == b"hello"


def test_access_log_only_when_asked(procs) -> None:
    quiet, address = start(procs)
    get(address, "/?quiet=1")
    loud, loud_address = start(procs, "--access-log", "-")
    get(loud_address, "/big?loud=1")
    loud.wait_for_output('"GET /big?loud=1 HTTP/1.1" 200 65536')
    assert "quiet=1" not in quiet.output()


def test_app_error_is_logged_with_its_traceback(procs) -> None:
    proc, address = start(procs)
    assert parse_response(get(address, "/error")).status == 500
    proc.wait_for_output("boom before start_response")
    out = proc.output()
    assert "[ERROR] error in the application" in out, out
    assert "Traceback" in out.split("[ERROR] error in the application", 1)[1]
    assert parse_response(get(address, "/")).body == b"hello"


def test_unix_socket_environ_names_the_socket(procs, short_tmp: Path) -> None:
    path = str(short_tmp / "b.sock")
    _, address = start(procs, address=path)
    env = json.loads(parse_response(get(address, "/environ")).body)
    assert env["REMOTE_ADDR"] == path
    assert env["SERVER_NAME"] == "localhost"  # the Host header
    assert env["QUERY_STRING"] == ""


def test_ipv6_environ(procs) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    address = ("::1", free_port(socket.AF_INET6))
    _, address = start(procs, address=address)
    env = json.loads(parse_response(get(address, "/environ")).body)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("::1", str(address[1]))
    assert "REMOTE_ADDR" not in env  # bjoern cannot read an IPv6 peer: none beats a wrong one


def test_tcp_environ(procs) -> None:
    _, address = start(procs)
    env = json.loads(parse_response(get(address, "/environ?a=1")).body)
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", str(address[1]))
    assert env["QUERY_STRING"] == "a=1"


def test_one_app_call_at_a_time(procs, tmp_path: Path) -> None:
    """What the registry says: a request waits while another one's app call runs."""
    _, address = start(procs)
    with connect(address) as busy, connect(address) as other:
        first = gate(busy, tmp_path)
        send(other, "GET", "/")
        assert not select.select([other], [], [], QUIET)[0], "served during another app call"
        (tmp_path / "go").touch()
        assert parse_response(first + read_until_closed(busy)).body == b"open\ndone\n"
        assert parse_response(read_until_closed(other)).body == b"hello"
