"""Sockets, as a process manager and a user meet them: real chaussette processes throughout.

- adoption: a parent binds TCP, TCP6 and unix sockets, listens, and passes the fd
  (``--fd N`` or ``--host fd://N``); no --address-family is ever given;
- refusals of an fd that cannot be served: exit 2, one line, and the parent's fd unharmed;
- our own binds: TCP v4/v6, unix sockets and who may remove which file;
- close-on-exec: the listener never reaches the programs the application runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ROUTES_APP,
    Proc,
    child_env,
    free_port,
    http_request,
    wait_http,
)

FDCHECK_APP = "tests.apps.sock_fdcheck:application"

Address = tuple[str, int] | str


# -- helpers --


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here")


@contextlib.contextmanager
def parent_listener(kind: str, tmp: Path) -> Iterator[tuple[socket.socket, Address]]:
    """A listening socket bound by the test, as a process manager would make it."""
    if kind == "tcp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
    elif kind == "tcp6":
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(("::1", 0))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp / "mgr.sock"))
    with sock:
        sock.listen(16)
        name = sock.getsockname()
        yield sock, name if kind == "unix" else (name[0], name[1])


def served_where(address: Address) -> str:
    """How the startup line names an address."""
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def refused(proc: Proc) -> str:
    """The one line a refused start prints; asserts exit code 2 and nothing else printed."""
    code = proc.wait(30)
    out = proc.output()
    lines = out.splitlines()
    assert code == 2, out
    assert len(lines) == 1, out
    assert lines[0].startswith("chaussette: error: "), out
    return lines[0]


def still_accepts(sock: socket.socket, address: Address) -> None:
    """The test's listening socket still works: a client connects and its bytes arrive.

    Connections queued before (a probe that already went away) are skipped.
    """
    sock.settimeout(10)
    family = socket.AF_UNIX if isinstance(address, str) else sock.family
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(address)
        client.sendall(b"ping")
        for _ in range(5):
            conn, _ = sock.accept()
            with conn:
                conn.settimeout(10)
                if conn.recv(4) == b"ping":
                    return
    raise AssertionError("the client's connection never reached the test's socket")


def log_of(proc: Proc) -> str:
    """The whole output, also once the process is stopped."""
    return proc.log_path.read_text(errors="replace")


def serving_count(proc: Proc) -> int:
    return proc.output().count("] [INFO] chaussette ")


def wait_restarted(proc: Proc, before: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving_count(proc) > before:
            return
        assert proc.popen.poll() is None, proc.output()
        time.sleep(0.05)
    raise AssertionError(f"no restart seen:\n{proc.output()}")


def inode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


# -- adoption of an inherited fd --


ADOPT_KINDS = ["tcp", pytest.param("tcp6", marks=needs_ipv6), "unix"]


@pytest.mark.parametrize("how", ["--fd", "fd://"])
@pytest.mark.parametrize("kind", ADOPT_KINDS)
def test_adopts_inherited_listener(procs, short_tmp, kind, how):
    with parent_listener(kind, short_tmp) as (sock, address):
        fd = sock.fileno()
        spec = ["--fd", str(fd)] if how == "--fd" else ["--host", f"fd://{fd}"]
        proc = procs.chaussette(*spec, ROUTES_APP, pass_fds=(fd,))
        resp = wait_http(address, proc)
        assert (resp.status, resp.body) == (200, b"hello")
        # the family was read from the kernel, not guessed
        origin = f"from --fd {fd}" if how == "--fd" else f"from --host fd://{fd}"
        proc.wait_for_output(f"on {served_where(address)} (fd {fd}, {origin})")
        body = http_request(address, "/echo", "POST", body=b"x" * 1000).body
        assert body.startswith(b"1000 ")
        assert proc.stop() == 0
        still_accepts(sock, address)


def test_adopts_abstract_unix_socket(procs):
    """Linux's abstract namespace: no file at all; the log names it @name."""
    name = f"chaussette-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("\0" + name)
        sock.listen(16)
        fd = sock.fileno()
        proc = procs.chaussette("--fd", str(fd), ROUTES_APP, pass_fds=(fd,))
        assert wait_http("\0" + name, proc).body == b"hello"
        proc.wait_for_output(f"on unix:@{name} (fd {fd}, from --fd {fd})")
        assert proc.stop() == 0


# -- refusals of an inherited fd --


CLOSED_FD = 900  # nothing opens this many files in a freshly started chaussette


def _refusal_case(case: str, tmp: Path, stack: contextlib.ExitStack):
    """(fd to pass, extra args, check that the parent's fd is unharmed, words expected)."""
    if case == "closed":
        return CLOSED_FD, [], None, "not an open file descriptor"
    if case == "regular-file":
        path = tmp / "data.txt"
        path.write_bytes(b"precious")
        fd = os.open(path, os.O_RDONLY)
        stack.callback(os.close, fd)

        def file_intact() -> None:
            assert os.pread(fd, 100, 0) == b"precious"

        return fd, [], file_intact, "not a socket"
    if case == "pipe":
        r, w = os.pipe()
        stack.callback(os.close, r)
        stack.callback(os.close, w)

        def pipe_works() -> None:
            os.write(w, b"still")
            assert os.read(r, 5) == b"still"

        return r, [], pipe_works, "not a socket"
    if case == "udp":
        udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.bind(("127.0.0.1", 0))

        def udp_works() -> None:
            udp.settimeout(10)
            udp.sendto(b"dgram", udp.getsockname())
            assert udp.recv(10) == b"dgram"

        return udp.fileno(), [], udp_works, "not a stream socket (type SOCK_DGRAM)"
    if case == "unix-dgram":
        dgram = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        dgram.bind(str(tmp / "dgram.sock"))

        def dgram_works() -> None:
            dgram.settimeout(10)
            dgram.sendto(b"dgram", dgram.getsockname())
            assert dgram.recv(10) == b"dgram"

        return dgram.fileno(), [], dgram_works, "not a stream socket (type SOCK_DGRAM)"
    if case == "tcp-not-listening":
        tcp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        tcp.bind(("127.0.0.1", 0))

        def can_listen_now() -> None:
            tcp.listen(1)
            still_accepts(tcp, tcp.getsockname())

        return tcp.fileno(), [], can_listen_now, "not listening"
    if case == "unix-connected":
        left, right = socket.socketpair()
        stack.enter_context(left)
        stack.enter_context(right)

        def pair_works() -> None:
            right.settimeout(10)
            left.sendall(b"pair")
            assert right.recv(4) == b"pair"

        return left.fileno(), [], pair_works, "not listening"
    # a good listening socket, refused for the options around it
    listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    extra = {"with-host": ["--host", "127.0.0.1"], "with-port": ["--port", str(free_port())]}
    option = extra[case][0]

    def listener_works() -> None:
        still_accepts(listener, listener.getsockname())

    return listener.fileno(), extra[case], listener_works, f"--fd and {option}"


REFUSALS = [
    "closed",
    "regular-file",
    "pipe",
    "udp",
    "unix-dgram",
    "tcp-not-listening",
    "unix-connected",
    "with-host",
    "with-port",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_refuses_unusable_fd(procs, short_tmp, case):
    with contextlib.ExitStack() as stack:
        fd, extra, unharmed, words = _refusal_case(case, short_tmp, stack)
        passed = () if case == "closed" else (fd,)
        blocking = os.get_blocking(fd) if passed else None
        proc = procs.chaussette("--fd", str(fd), *extra, ROUTES_APP, pass_fds=passed)
        line = refused(proc)
        assert f"--fd {fd}" in line or "--fd and" in line, line
        assert words in line, line
        if unharmed is not None:
            assert os.get_blocking(fd) == blocking  # the child changed no flag of ours
            unharmed()


def test_refuses_through_fd_url(procs):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        fd = udp.fileno()
        proc = procs.chaussette("--host", f"fd://{fd}", ROUTES_APP, pass_fds=(fd,))
        line = refused(proc)
        assert f"--host fd://{fd}: not a stream socket" in line, line


@pytest.mark.parametrize("spec", ["fd://x", "fd://", "fd://-1"])
def test_refuses_malformed_fd_url(procs, spec):
    line = refused(procs.chaussette("--host", spec, ROUTES_APP))
    assert spec in line and "fd://N" in line, line


def test_refuses_absurd_fd_number(procs):
    line = refused(procs.chaussette("--fd", "99999999999999999999", ROUTES_APP))
    assert "--fd 99999999999999999999: not an open file descriptor" in line, line


# -- sockets chaussette binds: TCP --


def test_binds_tcp4(procs):
    port = free_port()
    proc = procs.chaussette("--host", "127.0.0.1", "--port", str(port), ROUTES_APP)
    assert wait_http(("127.0.0.1", port), proc).body == b"hello"
    proc.wait_for_output(f"on http://127.0.0.1:{port} (fd ")
    assert proc.stop() == 0


@needs_ipv6
def test_binds_tcp6_literal(procs):
    port = free_port(socket.AF_INET6)
    proc = procs.chaussette("--host", "[::1]", "--port", str(port), ROUTES_APP)
    assert wait_http(("::1", port), proc).body == b"hello"
    proc.wait_for_output(f"on http://[::1]:{port} (fd ")
    assert proc.stop() == 0


@pytest.mark.parametrize("family", ["tcp", pytest.param("tcp6", marks=needs_ipv6)])
def test_port_in_use(procs, short_tmp, family):
    with parent_listener(family, short_tmp) as (holder, (host, port)):
        shown = f"[{host}]" if ":" in host else host
        proc = procs.chaussette("--host", shown, "--port", str(port), ROUTES_APP)
        line = refused(proc)
        assert f"cannot bind {shown}:{port}: Address already in use" in line, line
        still_accepts(holder, (host, port))


def test_unresolvable_host(procs):
    line = refused(procs.chaussette("--host", "no-such-host.invalid", ROUTES_APP))
    assert "--host no-such-host.invalid: cannot resolve" in line, line


# -- sockets chaussette binds: unix --


def test_unix_socket_lives_while_serving(procs, short_tmp):
    path = short_tmp / "app.sock"
    proc = procs.chaussette("--host", f"unix:{path}", ROUTES_APP)
    assert wait_http(str(path), proc).body == b"hello"
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    proc.wait_for_output(f"on unix:{path} (fd ")
    assert proc.stop(signal.SIGTERM) == 0
    assert not path.exists(), log_of(proc)


@pytest.mark.parametrize("mode", [0o666, 0o600])
def test_socket_mode(procs, short_tmp, mode):
    path = short_tmp / "app.sock"
    proc = procs.chaussette("--host", f"unix:{path}", "--socket-mode", f"{mode:o}", ROUTES_APP)
    wait_http(str(path), proc)
    assert stat.S_IMODE(os.lstat(path).st_mode) == mode
    assert proc.stop() == 0


def test_relative_unix_path_removed_after_app_chdir(procs, short_tmp):
    """The app changes directory when imported; the file is still found and removed."""
    path = short_tmp / "rel.sock"
    env = child_env({"SOCK_FDCHECK_CHDIR": "/"})
    proc = procs.chaussette("--host", "unix:rel.sock", FDCHECK_APP, cwd=short_tmp, env=env)
    wait_http(str(path), proc)
    assert proc.stop() == 0
    assert not path.exists(), log_of(proc)


def test_stale_socket_file_is_replaced(procs, short_tmp):
    path = short_tmp / "app.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))  # closed without unlink: a socket file nobody listens on
    os.link(path, short_tmp / "keep")  # holds the old inode, so it cannot be reused
    stale = inode(path)
    proc = procs.chaussette("--host", f"unix:{path}", ROUTES_APP)
    assert wait_http(str(path), proc).body == b"hello"
    assert inode(path) != stale
    assert f"removing stale unix socket {path}" in proc.output()
    assert proc.stop() == 0
    assert not path.exists()


def test_live_socket_is_refused_and_left_alone(procs, short_tmp):
    path = short_tmp / "app.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(4)
        before = inode(path)
        line = refused(procs.chaussette("--host", f"unix:{path}", ROUTES_APP))
        assert f"unix:{path}: another process is listening on it" in line, line
        assert inode(path) == before
        still_accepts(live, str(path))


def test_live_socket_with_full_queue_is_refused(procs, short_tmp):
    """A busy server (listen queue full) is alive too; the check must not hang on it."""
    path = short_tmp / "app.sock"
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        live.bind(str(path))
        live.listen(0)
        for _ in range(64):  # fill the queue: connects that would block are the proof
            client = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        else:
            pytest.fail("the listen queue never filled")
        line = refused(procs.chaussette("--host", f"unix:{path}", ROUTES_APP))
        assert "another process is listening on it" in line, line
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_regular_file_in_the_way_is_never_deleted(procs, short_tmp):
    path = short_tmp / "app.sock"
    path.write_text("not a socket, keep me")
    line = refused(procs.chaussette("--host", f"unix:{path}", ROUTES_APP))
    assert f"unix:{path}: a file that is not a socket is in the way" in line, line
    assert path.read_text() == "not a socket, keep me"


def test_inherited_unix_socket_is_never_unlinked(procs, short_tmp):
    with parent_listener("unix", short_tmp) as (sock, path):
        before = inode(Path(path))
        proc = procs.chaussette("--fd", str(sock.fileno()), ROUTES_APP, pass_fds=(sock.fileno(),))
        wait_http(path, proc)
        assert proc.stop(signal.SIGTERM) == 0
        assert inode(Path(path)) == before, log_of(proc)
        still_accepts(sock, path)


def test_replaced_socket_file_is_not_removed(procs, short_tmp):
    path = short_tmp / "app.sock"
    proc = procs.chaussette("--host", f"unix:{path}", ROUTES_APP)
    wait_http(str(path), proc)
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newcomer:
        newcomer.bind(str(path))
        newcomer.listen(4)
        theirs = inode(path)
        assert proc.stop(signal.SIGTERM) == 0
        assert inode(path) == theirs, log_of(proc)
        assert f"not removing {path}: it is no longer the socket we created" in log_of(proc)
        still_accepts(newcomer, str(path))


@pytest.mark.parametrize("origin", ["bound", "inherited"])
def test_unix_ownership_survives_restart_in_place(procs, short_tmp, origin):
    """After SIGHUP (a re-exec), the file we bound is still ours; an inherited one is not."""
    with contextlib.ExitStack() as stack:
        if origin == "bound":
            path = str(short_tmp / "app.sock")
            proc = procs.chaussette("--host", f"unix:{path}", ROUTES_APP)
        else:
            sock, path = stack.enter_context(parent_listener("unix", short_tmp))
            fd = sock.fileno()
            proc = procs.chaussette("--fd", str(fd), ROUTES_APP, pass_fds=(fd,))
        wait_http(path, proc)
        before = serving_count(proc)
        proc.send(signal.SIGHUP)
        wait_restarted(proc, before)
        assert wait_http(path, proc).body == b"hello"
        assert proc.stop() == 0
        assert os.path.exists(path) == (origin == "inherited"), log_of(proc)


# -- close-on-exec --


def fdcheck(address: Address, query: str = "") -> dict:
    resp = http_request(address, "/" + query)
    assert resp.status == 200, resp.raw
    return json.loads(resp.body)


def test_fdcheck_sees_a_leak(procs):
    """The check itself: a listening socket made inheritable on purpose is found."""
    port = free_port()
    proc = procs.chaussette("--port", str(port), FDCHECK_APP)
    wait_http(("127.0.0.1", port), proc)
    report = fdcheck(("127.0.0.1", port), "?control=1")
    assert len(report["child"]) == 1, report
    assert report["child"][0]["family"] == "AF_INET"
    assert proc.stop() == 0


@pytest.mark.parametrize("origin", ["bound", "inherited"])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_listener_does_not_leak_into_app_children(procs, short_tmp, kind, origin):
    with contextlib.ExitStack() as stack:
        if origin == "inherited":
            sock, address = stack.enter_context(parent_listener(kind, short_tmp))
            fd = sock.fileno()
            proc = procs.chaussette("--fd", str(fd), FDCHECK_APP, pass_fds=(fd,))
        elif kind == "tcp":
            address = ("127.0.0.1", free_port())
            proc = procs.chaussette("--port", str(address[1]), FDCHECK_APP)
        else:
            address = str(short_tmp / "app.sock")
            proc = procs.chaussette("--host", f"unix:{address}", FDCHECK_APP)
        wait_http(address, proc)
        report = fdcheck(address)
        family = "AF_UNIX" if kind == "unix" else "AF_INET"
        assert [s["family"] for s in report["server"]] == [family], report
        assert report["child"] == [], report
        assert proc.stop() == 0


def test_listener_on_fd0_moves_off_stdin(procs):
    """Supervisor's fcgi-program passes the socket as fd 0: the app's children must get
    neither the socket nor a closed stdin."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        address = sock.getsockname()
        fd = sock.fileno()
        # as a manager does it: the socket on fd 0, then exec chaussette --fd 0
        trampoline = (
            "import os, sys; os.dup2(int(sys.argv[1]), 0); os.close(int(sys.argv[1])); "
            "os.execv(sys.executable, [sys.executable, '-m', 'chaussette', *sys.argv[2:]])"
        )
        proc = procs.start(
            [sys.executable, "-c", trampoline, str(fd), "--fd", "0", FDCHECK_APP], pass_fds=(fd,)
        )
        wait_http(address, proc)
        report = fdcheck(address)
        assert [s["family"] for s in report["server"]] == ["AF_INET"], report
        assert report["server"][0]["fd"] > 2, report
        assert report["child"] == [], report
        assert report["child_stdin"] == "/dev/null", report
        assert proc.stop() == 0
        still_accepts(sock, address)
