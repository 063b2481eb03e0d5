"""systemd socket activation (LISTEN_FDS / LISTEN_PID) and readiness (NOTIFY_SOCKET).

``systemd-socket-activate`` (Debian ``systemd``) is a real activator: it binds, waits for
the first connection, then execs the command with the socket on fd 3 and LISTEN_FDS=1,
LISTEN_PID=<its own pid>. The notify side is a datagram socket the test binds, as systemd
would.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import (
    ROOT,
    ROUTES_APP,
    Proc,
    child_env,
    connect,
    free_port,
    http_request,
    require_peer,
    wait_http,
)

# What systemd-socket-activate itself prints, before it becomes chaussette.
ACTIVATOR_LINES = ("Listening on ", "Communication attempt on fd", "Execing ")


def activate(procs, listen: str, *args: str) -> Proc:
    """``systemd-socket-activate -l LISTEN python -m chaussette ARGS``, listening."""
    activator = require_peer("systemd-socket-activate", "systemd")
    # The activator gives its child a minimal environment: find the app by --python-path.
    proc = procs.start(
        [
            activator,
            "-l",
            listen,
            sys.executable,
            "-m",
            "chaussette",
            "--python-path",
            str(ROOT),
            *args,
        ]
    )
    proc.wait_for_output("Listening on ")
    return proc


def own_lines(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if line.strip() and not line.startswith(ACTIVATOR_LINES)
    ]


@pytest.mark.peer
def test_activated_tcp_socket(procs):
    port = free_port()
    proc = activate(procs, f"127.0.0.1:{port}", ROUTES_APP)
    # The first connection starts chaussette; it waits in the socket's queue meanwhile
    # and is answered.
    first = http_request(("127.0.0.1", port), "/pid", timeout=30)
    assert first.status == 200, proc.output()
    # The activator exec'd itself into chaussette: LISTEN_PID was this very process.
    assert int(first.body) == proc.pid
    proc.wait_for_output("(fd 3, systemd)")
    assert http_request(("127.0.0.1", port), "/echo", "POST", body=b"abc").body.startswith(b"3 ")
    assert proc.stop() == 0, proc.output()


@pytest.mark.peer
def test_activated_unix_socket(procs, short_tmp):
    path = str(short_tmp / "web.sock")
    proc = activate(procs, path, ROUTES_APP)
    first = http_request(path, "/pid", timeout=30)
    assert first.status == 200, proc.output()
    assert int(first.body) == proc.pid
    proc.wait_for_output(f"unix:{path} (fd 3, systemd)")
    assert proc.stop() == 0, proc.output()
    # chaussette did not bind that path, so it must not remove it.
    assert os.path.exists(path), proc.output()


@pytest.mark.peer
@pytest.mark.parametrize("option", ["--host", "--port"])
def test_activated_with_explicit_address_is_refused(procs, option):
    port = free_port()
    value = "127.0.0.1" if option == "--host" else str(free_port())
    proc = activate(procs, f"127.0.0.1:{port}", option, value, ROUTES_APP)
    with connect(("127.0.0.1", port)):  # starts chaussette
        assert proc.wait(30) == 2
    lines = own_lines(proc.output())
    assert len(lines) == 1, lines
    assert lines[0].startswith("chaussette: error: ")
    assert "LISTEN_FDS" in lines[0] and option in lines[0], lines[0]


def test_listen_pid_of_another_process_is_ignored(procs):
    """LISTEN_* meant for another process (here pid 1) is not ours: bind --port."""
    port = free_port()
    env = child_env({"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    proc = procs.chaussette("--port", str(port), ROUTES_APP, env=env)
    wait_http(("127.0.0.1", port), proc)
    assert int(http_request(("127.0.0.1", port), "/pid").body) == proc.pid
    proc.wait_for_output(f"http://127.0.0.1:{port} (fd")
    assert "systemd)" not in proc.output()
    assert proc.stop() == 0, proc.output()


# -- sd_notify --


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, short_tmp) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's; yields it and its NOTIFY_SOCKET value."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = name = str(short_tmp / "notify")
    else:
        name = f"@chaussette-test-{uuid.uuid4().hex}"
        address = "\0" + name[1:]
    with sock:
        sock.bind(address)
        sock.settimeout(20)
        yield sock, name


def test_sd_notify_ready_and_stopping(procs, notify_socket):
    sock, name = notify_socket
    port = free_port()
    proc = procs.chaussette("--port", str(port), ROUTES_APP, env=child_env({"NOTIFY_SOCKET": name}))
    try:
        ready = sock.recv(4096)
    except TimeoutError:
        raise AssertionError(f"no READY=1 on {name!r}\n{proc.output()}") from None
    assert ready == b"READY=1"
    # READY means serving: the first request is answered without any retry.
    assert http_request(("127.0.0.1", port), "/").body == b"hello"
    proc.send(signal.SIGTERM)
    try:
        stopping = sock.recv(4096)
    except TimeoutError:
        raise AssertionError(f"no STOPPING=1 on {name!r}\n{proc.output()}") from None
    assert stopping == b"STOPPING=1"
    assert proc.wait(30) == 0, proc.output()
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # nothing else was sent


# -- sd_notify across a reload (issue 6) --

RELOAD_APP = """\
import os

VERSION = {version!r}


def application(environ, start_response):
    body = VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def next_state(sock: socket.socket, proc: Proc, what: str) -> dict[str, str]:
    """The next datagram, as a dict of its NAME=value lines."""
    try:
        data = sock.recv(4096)
    except TimeoutError:
        raise AssertionError(f"no {what} datagram\n{proc.output()}") from None
    fields = dict(line.split("=", 1) for line in data.decode().splitlines())
    assert what in fields, (data, proc.output())
    return fields


@pytest.fixture
def notify_path(short_tmp) -> Iterator[tuple[socket.socket, str]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(short_tmp / "notify"))
        sock.settimeout(20)
        yield sock, str(short_tmp / "notify")


@pytest.mark.parametrize("workers", [None, "2"], ids=["single", "workers"])
def test_sd_notify_reload_cycle(procs, tmp_path, notify_path, workers):
    """READY, then on SIGHUP RELOADING (with MONOTONIC_USEC, which Type=notify-reload
    needs), READY again once the new code serves, STOPPING on SIGTERM; nothing else (with
    --workers, what the workers say stays with the master)."""
    sock, name = notify_path
    app = tmp_path / "reload_app.py"
    app.write_text(RELOAD_APP.format(version="v1"))
    port = free_port()
    args = ["--port", str(port), *(["--workers", workers] if workers else []), str(app)]
    proc = procs.chaussette(*args, env=child_env({"NOTIFY_SOCKET": name}))
    address = ("127.0.0.1", port)
    assert next_state(sock, proc, "READY") == {"READY": "1"}
    assert http_request(address, "/").body == b"v1"  # READY means serving
    app.write_text(RELOAD_APP.format(version="v2."))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proc.send(signal.SIGHUP)
    reloading = next_state(sock, proc, "RELOADING")
    assert reloading["RELOADING"] == "1" and set(reloading) == {"RELOADING", "MONOTONIC_USEC"}
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after, reloading
    assert next_state(sock, proc, "READY") == {"READY": "1"}
    # READY again means the new code serves, at once
    assert http_request(address, "/").body == b"v2."
    proc.send(signal.SIGTERM)
    assert next_state(sock, proc, "STOPPING") == {"STOPPING": "1"}
    assert proc.wait(30) == 0, proc.output()
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # nothing else was sent
