"""The lifecycle of real chaussette processes: signals, drain, re-exec, hooks, reloader."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    HTTPResponse,
    Proc,
    child_env,
    connect,
    free_port,
    http_request,
    read_all,
    wait_http,
)

LIFE_APP = "tests.apps.life_app:application"
HOOKS = "tests.apps.life_hooks"

VERSIONED_APP = """\
import os
import signal

VERSION = {version!r}
IMPORT_MASK = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def application(environ, start_response):
    if environ["PATH_INFO"] == "/mask":  # the signals blocked while this module was imported
        body = repr(IMPORT_MASK).encode()
    else:
        body = f"{{VERSION}} {{os.getpid()}}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


def write_app(path: Path, version: str) -> None:
    """(Re)write the versioned app. Versions differ in length, so that a cached .pyc of the
    previous one can never pass for it (see test_sighup_same_size_edit_of_file_app)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(VERSIONED_APP.format(version=version))
    os.replace(tmp, path)


def version(n: int) -> str:
    return f"v{n}" + "." * n


def wait_file(path: Path, proc: Proc, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return path.read_text()
        if proc.popen.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"{path} not written:\n{proc.output()}")


def wait_refused(address: tuple[str, int] | str, timeout: float = 10) -> None:
    """Poll until connecting is refused (the listening socket is closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sock = connect(address, timeout=2)
        except (ConnectionRefusedError, FileNotFoundError):
            return
        sock.close()
        time.sleep(0.02)
    raise AssertionError(f"{address} still accepts connections")


def wait_exit(proc: Proc, timeout: float = 15) -> int:
    try:
        return proc.wait(timeout)
    except Exception:
        raise AssertionError(f"still running after {timeout}s:\n{proc.output()}") from None


class Client(threading.Thread):
    """One request on a thread; keeps the response or the exception."""

    def __init__(self, address: tuple[str, int] | str, path: str) -> None:
        super().__init__(daemon=True)
        self.address, self.path = address, path
        self.response: HTTPResponse | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = http_request(self.address, self.path, timeout=30)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 30) -> HTTPResponse:
        self.join(timeout)
        assert not self.is_alive(), f"request {self.path} still waiting"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def start_slow(procs, tmp_path: Path, seconds: float, *args: str):
    """A chaussette on a fresh TCP port with one slow request in flight (known to run)."""
    port = free_port()
    proc = procs.chaussette("--port", str(port), *args, LIFE_APP)
    address = ("127.0.0.1", port)
    wait_http(address, proc)
    marker = tmp_path / f"started-{time.monotonic_ns()}"
    client = Client(address, f"/slow?s={seconds}&marker={marker}")
    client.start()
    wait_file(marker, proc)
    return proc, address, client


# -- stopping --


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_lets_in_flight_request_finish(procs, tmp_path, signum):
    proc, address, client = start_slow(procs, tmp_path, 2)
    proc.send(signum)
    name = signal.Signals(signum).name
    proc.wait_for_output(f"{name}: stopping")
    # A connection made now is never served by this process: it is either refused, or
    # queued and then reset or closed when the process exits.
    late: socket.socket | None = None
    try:
        late = connect(address, timeout=10)
        late.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
        if late is not None:
            late.close()
            late = None
    # The socket we bound is closed while the slow request is still being served.
    wait_refused(address)
    assert client.is_alive(), "the slow request ended before the drain closed the socket"
    resp = client.result()
    assert resp.status == 200
    assert resp.body == f"slow done {proc.pid}".encode()
    assert wait_exit(proc) == 0
    if late is not None:
        with late:
            try:
                leftover = read_all(late)
            except ConnectionResetError:
                leftover = b""
        assert leftover == b"", leftover
    out = proc.output()
    assert "all requests finished" in out
    assert "stopped (exit 0)" in out


def test_stop_removes_own_unix_socket_during_drain(procs, short_tmp, tmp_path):
    path = str(short_tmp / "s.sock")
    proc = procs.chaussette("--host", f"unix:{path}", LIFE_APP)
    wait_http(path, proc)
    marker = tmp_path / "started"
    client = Client(path, f"/slow?s=2&marker={marker}")
    client.start()
    wait_file(marker, proc)
    proc.send(signal.SIGTERM)
    wait_refused(path)  # file gone (or nothing listening) while the request still runs
    assert client.is_alive()
    assert not os.path.exists(path)
    assert client.result().body == f"slow done {proc.pid}".encode()
    assert wait_exit(proc) == 0
    assert not os.path.exists(path)


def test_second_sigint_exits_at_once(procs, tmp_path):
    proc, _, client = start_slow(procs, tmp_path, 10)
    proc.send(signal.SIGINT)
    proc.wait_for_output("SIGINT: stopping")
    proc.send(signal.SIGINT)
    assert wait_exit(proc, 5) == 1
    with pytest.raises((AssertionError, OSError)):  # cut: no complete response
        client.result(5)
    assert "SIGINT while draining: exiting now, cutting 1 request(s)" in proc.output()


def test_sigquit_exits_at_once_and_removes_own_unix_socket(procs, short_tmp, tmp_path):
    path = str(short_tmp / "q.sock")
    proc = procs.chaussette("--host", f"unix:{path}", LIFE_APP)
    wait_http(path, proc)
    marker = tmp_path / "started"
    client = Client(path, f"/slow?s=10&marker={marker}")
    client.start()
    wait_file(marker, proc)
    proc.send(signal.SIGQUIT)
    assert wait_exit(proc, 5) == 1  # one request was cut
    with pytest.raises((AssertionError, OSError)):
        client.result(5)
    assert not os.path.exists(path)
    assert "SIGQUIT: exiting now, 1 request(s) in flight" in proc.output()


def test_sigquit_when_idle_exits_0(procs):
    # The probe's connection counts as in flight until the worker that closed it has done
    # its bookkeeping, a moment after the client reads the end: a SIGQUIT landing in that
    # moment rightly says "1 request(s) in flight" and exits 1. Then try again (bounded).
    for _ in range(3):
        port = free_port()
        proc = procs.chaussette("--port", str(port), LIFE_APP)
        wait_http(("127.0.0.1", port), proc)
        proc.send(signal.SIGQUIT)
        code = wait_exit(proc, 5)
        if "exiting now, 1 request(s) in flight" not in proc.output():
            break
    assert "exiting now, 0 request(s) in flight" in proc.output(), proc.output()
    assert code == 0


def test_graceful_timeout_cuts_the_request_and_exits_1(procs, tmp_path):
    proc, _, client = start_slow(procs, tmp_path, 10, "--graceful-timeout", "1")
    proc.send(signal.SIGTERM)
    assert wait_exit(proc, 8) == 1  # long before the 10 s request could end
    with pytest.raises((AssertionError, OSError)):
        client.result(5)
    out = proc.output()
    assert "graceful timeout (1.0s) passed: cutting 1 request(s)" in out
    assert "stopped (exit 1)" in out


def test_sigterm_during_restart_drain_stops_instead(procs, tmp_path):
    proc, address, client = start_slow(procs, tmp_path, 2)
    proc.send(signal.SIGHUP)
    proc.wait_for_output("SIGHUP: restarting in place")
    proc.send(signal.SIGTERM)
    assert client.result().body == f"slow done {proc.pid}".encode()
    assert wait_exit(proc) == 0
    out = proc.output()
    assert "SIGTERM while restarting: stopping instead" in out
    assert "re-executing" not in out
    with pytest.raises(ConnectionRefusedError):
        connect(address, timeout=2).close()


# -- restart in place --


def _hammer(address, stop: threading.Event, errors: list, seen: set, counts: list) -> None:
    for _ in range(5000):  # bounded; normally ended by ``stop``
        if stop.is_set():
            return
        try:
            resp = http_request(address, "/", timeout=10)
            assert resp.status == 200, resp.raw[:200]
            seen.add(resp.body.decode())
            counts.append(1)
        except (OSError, AssertionError) as exc:
            errors.append(repr(exc))


def _sighup_under_load(proc: Proc, address, app_file: Path, hups: int = 4) -> set[str]:
    stop = threading.Event()
    errors: list[str] = []
    seen: set[str] = set()
    counts: list[int] = []
    clients = [
        threading.Thread(target=_hammer, args=(address, stop, errors, seen, counts), daemon=True)
        for _ in range(4)
    ]
    for t in clients:
        t.start()
    try:
        for n in range(2, 2 + hups):
            time.sleep(0.4)
            write_app(app_file, version(n))
            proc.send(signal.SIGHUP)
            if n == 3:  # and a burst, some of it landing while the new image starts
                for _ in range(3):
                    time.sleep(0.03)
                    proc.send(signal.SIGHUP)
            assert proc.popen.poll() is None, proc.output()
        time.sleep(0.4)
        assert proc.popen.poll() is None, proc.output()
        for _ in range(20):  # sequential requests on top of the concurrent ones
            assert http_request(address, "/", timeout=15).status == 200
    finally:
        stop.set()
        for t in clients:
            t.join(20)
    assert errors == [], errors[:5]
    assert len(counts) >= 20, f"only {len(counts)} requests made"
    assert proc.popen.poll() is None, proc.output()
    # new code answers afterwards, from the same process
    final = f"{version(1 + hups)} {proc.pid}"
    deadline = time.monotonic() + 15
    while http_request(address, "/").body.decode() != final:
        assert time.monotonic() < deadline, f"{final!r} never answered:\n{proc.output()}"
        time.sleep(0.05)
    assert all(s.endswith(f" {proc.pid}") for s in seen), seen
    out = proc.output()
    assert out.count("re-executing") >= 2, out
    return seen


def test_sighup_under_load_tcp(procs, tmp_path):
    app_file = tmp_path / "vapp.py"
    write_app(app_file, version(1))
    port = free_port()
    proc = procs.chaussette("--port", str(port), str(app_file))
    address = ("127.0.0.1", port)
    wait_http(address, proc)
    mask = http_request(address, "/mask").body
    seen = _sighup_under_load(proc, address, app_file)
    assert len(seen) >= 2, seen  # the stream crossed restarts
    # signals are blocked across the re-exec, but not while the new image imports the app
    # (its threads and subprocesses would inherit the mask)
    assert http_request(address, "/mask").body == mask
    assert wait_exit_after(proc, signal.SIGTERM) == 0


def test_sighup_under_load_own_unix_socket(procs, tmp_path, short_tmp):
    app_file = tmp_path / "vapp.py"
    write_app(app_file, version(1))
    path = str(short_tmp / "h.sock")
    proc = procs.chaussette("--host", f"unix:{path}", str(app_file))
    wait_http(path, proc)
    inode = os.stat(path).st_ino
    _sighup_under_load(proc, path, app_file)
    assert os.stat(path).st_ino == inode  # the same socket file, never re-bound
    assert "(fd 3, re-exec)" in proc.output()
    assert wait_exit_after(proc, signal.SIGTERM) == 0
    assert not os.path.exists(path)  # removed at the final exit


def test_sighup_under_load_inherited_fd(procs, tmp_path):
    app_file = tmp_path / "vapp.py"
    write_app(app_file, version(1))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        address = listener.getsockname()
        fd = listener.fileno()
        proc = procs.chaussette("--fd", str(fd), str(app_file), pass_fds=(fd,))
        wait_http(address, proc)
        _sighup_under_load(proc, address, app_file)
        assert f"(fd {fd}, re-exec)" in proc.output()
        assert wait_exit_after(proc, signal.SIGTERM) == 0
        # the parent's socket is still open and listening: it was never ours to close
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


def wait_exit_after(proc: Proc, signum: int) -> int:
    proc.send(signum)
    return wait_exit(proc)


def test_sighup_same_size_edit_of_file_app(procs, tmp_path):
    """A .pyc of the old file is trusted by Python when size and whole-second mtime match:
    a file app must be compiled from its source at each start."""
    app_file = tmp_path / "sapp.py"
    write_app(app_file, "AAAA")
    env = child_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the user's default: bytecode is cached
    port = free_port()
    proc = procs.chaussette("--port", str(port), str(app_file), env=env)
    address = ("127.0.0.1", port)
    assert wait_http(address, proc).body.startswith(b"AAAA ")
    before = os.stat(app_file)
    write_app(app_file, "BBBB")  # same size
    os.utime(app_file, ns=(before.st_atime_ns, before.st_mtime_ns))  # saved in that second
    proc.send(signal.SIGHUP)
    proc.wait_for_output("(fd 3, re-exec)")
    assert http_request(address, "/").body.startswith(b"BBBB ")


def test_failed_reexec_stops_cleanly(procs, tmp_path, short_tmp):
    # run through a link to the interpreter, then remove it: execve() of sys.executable fails
    python = tmp_path / "python"
    python.symlink_to(sys.executable)
    path = short_tmp / "x.sock"
    proc = procs.start([str(python), "-m", "chaussette", "--host", f"unix:{path}", LIFE_APP])
    wait_http(str(path), proc)
    python.unlink()
    assert wait_exit_after(proc, signal.SIGHUP) == 1
    out = proc.output()
    assert f"re-exec of {python} failed: No such file or directory; stopping" in out
    assert "stopped (exit 1)" in out
    assert not path.exists()


# -- log files --


@pytest.mark.parametrize("access", ["file", "-"])
def test_sigusr1_reopens_log_files(procs, tmp_path, access):
    log_file = tmp_path / "main.log"
    access_file = tmp_path / "access.log" if access == "file" else log_file
    port = free_port()
    proc = procs.chaussette(
        "--port",
        str(port),
        "--log-output",
        str(log_file),
        "--access-log",
        str(access_file) if access == "file" else "-",
        LIFE_APP,
    )
    address = ("127.0.0.1", port)
    wait_http(address, proc)
    os.rename(log_file, tmp_path / "main.log.1")
    if access == "file":
        os.rename(access_file, tmp_path / "access.log.1")
    proc.send(signal.SIGUSR1)
    n = 2 if access == "file" else 1
    deadline = time.monotonic() + 10
    while not (log_file.exists() and f"reopened {n} log file(s)" in log_file.read_text()):
        assert time.monotonic() < deadline, (tmp_path / "main.log.1").read_text()
        time.sleep(0.05)
    assert http_request(address, "/nope").status == 404
    assert wait_exit_after(proc, signal.SIGTERM) == 0
    old = (tmp_path / "main.log.1").read_text()
    assert "serving" in old and "SIGUSR1" not in old
    assert "stopped (exit 0)" in log_file.read_text()
    assert '"GET /nope HTTP/1.1" 404' in access_file.read_text()
    assert "GET / HTTP/1.1" not in access_file.read_text()  # the earlier request went before


# -- hooks --


def test_pre_and_post_hooks_receive_settings(procs, tmp_path):
    port = free_port()
    env = child_env({"LIFE_HOOK_DIR": str(tmp_path)})
    proc = procs.chaussette(
        "--port",
        str(port),
        "--pre-hook",
        f"{HOOKS}:pre",
        "--post-hook",
        f"{HOOKS}.post",
        LIFE_APP,
        env=env,
    )
    wait_http(("127.0.0.1", port), proc)
    assert (tmp_path / "pre").read_text() == f"{port} {LIFE_APP} {proc.pid}"
    assert not (tmp_path / "post").exists()
    assert wait_exit_after(proc, signal.SIGTERM) == 0
    # the post-hook ran after the server had stopped listening
    assert (tmp_path / "post").read_text() == f"{port} closed {proc.pid}"


def test_failing_pre_hook_stops_startup(procs, tmp_path, short_tmp):
    path = short_tmp / "p.sock"
    env = child_env({"LIFE_HOOK_DIR": str(tmp_path)})
    proc = procs.chaussette(
        "--host",
        f"unix:{path}",
        "--pre-hook",
        f"{HOOKS}:refuse",
        LIFE_APP,
        env=env,
    )
    assert wait_exit(proc) == 1
    out = proc.output()
    assert "Traceback (most recent call last)" in out
    assert "life_hooks.py" in out
    assert "RuntimeError: pre-hook refuses port 8080" in out
    errors = [line for line in out.splitlines() if line.startswith("chaussette: error:")]
    assert errors == [
        f"chaussette: error: --pre-hook {HOOKS}:refuse raised RuntimeError: "
        "pre-hook refuses port 8080"
    ], out
    assert not path.exists()  # no socket was bound
    assert "serving" not in out


def test_missing_pre_hook_module_is_one_line(procs):
    port = free_port()
    proc = procs.chaussette("--port", str(port), "--pre-hook", "tests.apps.life_nope:pre")
    assert wait_exit(proc) == 1
    lines = proc.output().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("chaussette: error: ")
    assert "life_nope" in lines[0]
    with socket.socket() as s:  # nothing was bound
        s.bind(("127.0.0.1", port))


def test_failing_post_hook_exits_1(procs, tmp_path):
    port = free_port()
    proc = procs.chaussette("--port", str(port), "--post-hook", f"{HOOKS}:broken_post", LIFE_APP)
    wait_http(("127.0.0.1", port), proc)
    assert wait_exit_after(proc, signal.SIGTERM) == 1
    out = proc.output()
    assert "ValueError: post-hook failed" in out
    assert [line for line in out.splitlines() if line.startswith("chaussette: error:")] == [
        f"chaussette: error: --post-hook {HOOKS}:broken_post raised ValueError: post-hook failed"
    ]


# -- reloader --


def test_reloader_restarts_in_place_on_change(procs, tmp_path):
    pytest.importorskip("watchfiles")
    app_file = tmp_path / "rapp.py"
    write_app(app_file, version(1))
    port = free_port()
    proc = procs.chaussette("--port", str(port), "--use-reloader", "rapp.py", cwd=tmp_path)
    address = ("127.0.0.1", port)
    first = wait_http(address, proc).body.decode()
    assert first == f"{version(1)} {proc.pid}"
    proc.wait_for_output("reloader watching")
    for n in range(2, 5):  # the watcher may start a moment after it says so: try again
        write_app(app_file, version(n))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            body = wait_http(address, proc).body.decode()
            if body != first:
                break
            time.sleep(0.05)
        if body != first:
            break
    assert body == f"{version(n)} {proc.pid}", proc.output()
    out = proc.output()
    assert "reloader: " in out and "rapp.py changed" in out
    assert "(fd 3, re-exec)" in out  # the same socket
    assert wait_exit_after(proc, signal.SIGTERM) == 0


def _run_hiding_watchfiles(procs, hide: str, *args: str) -> Proc:
    code = f"import sys; {hide}; from chaussette.cli import main; sys.exit(main())"
    return procs.start([sys.executable, "-c", code, *args])


def test_reloader_without_watchfiles_says_what_to_install(procs):
    port = free_port()
    proc = _run_hiding_watchfiles(
        procs, "sys.modules['watchfiles'] = None", "--port", str(port), "--use-reloader"
    )
    assert wait_exit(proc) == 2
    lines = proc.output().strip().splitlines()
    assert lines == [
        "chaussette: error: --use-reloader needs watchfiles: pip install 'chaussette[reload]'"
    ]


def test_reloader_with_broken_watchfiles_says_what_to_install(procs, tmp_path):
    # watchfiles is found (find_spec) but does not import, e.g. a wheel for another platform
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "watchfiles.py").write_text("raise ImportError('no native module')\n")
    port = free_port()
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT)])
    proc = procs.chaussette("--port", str(port), "--use-reloader", LIFE_APP, env=env)
    assert wait_exit(proc) == 2
    out = proc.output()
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1] == (
        "chaussette: error: --use-reloader needs watchfiles: pip install 'chaussette[reload]'"
    )
    with socket.socket() as s:  # the socket was closed
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_reloader_paths(tmp_path, monkeypatch):
    from chaussette.lifecycle import reloader_paths
    from chaussette.settings import Settings

    (tmp_path / "conf").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path / "src")
    paste = Settings(app=f"paste:{tmp_path}/conf/app.ini#main", python_path=["../lib", "gone"])
    assert reloader_paths(paste) == [
        str(tmp_path / "src"),
        str(tmp_path / "lib"),
        str(tmp_path / "conf"),
    ]
    monkeypatch.chdir("/")  # a service started in /: never watch the whole filesystem
    assert reloader_paths(Settings(app=f"{tmp_path}/conf/wsgi.py")) == [str(tmp_path / "conf")]
    assert reloader_paths(Settings(app="pkg.mod:app")) == []
