"""The command line as a user types it, through real ``chaussette`` processes.

Every classic flag is accepted and does what it says; bad values and bad combinations are
refused before anything starts (no log file, no hook run, no socket bound), with exit 2 and
one ``chaussette: error:`` line naming the options involved, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chaussette import __version__
from chaussette.backends import registry
from chaussette.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, UsageError
from chaussette.settings import OPTIONS, check, parse_args
from tests.conftest import (
    ROUTES_APP,
    TESTS,
    child_env,
    connect,
    error_line,
    free_port,
    http_request,
    read_all,
    require_peer,
    run_chaussette,
    wait_http,
)

HOOKS = "tests.apps.load_hooks"
LOCAL = "127.0.0.1"


run = run_chaussette


class Refusal:
    """Run a command line that must be refused before anything starts.

    It gets a --log-output file and a --pre-hook that leaves a marker: neither may appear.
    When ``hold_port``, the --port is held by us, listening: had chaussette tried to bind
    it, it would have said so instead of the expected message.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / "chaussette.log"
        self.marker = tmp / "hook-ran"

    def __call__(
        self, *args: str, hold_port: bool = False, env: dict[str, str] | None = None
    ) -> str:
        extra = ["--log-output", str(self.log), "--pre-hook", f"{HOOKS}:pre"]
        held = None
        if hold_port:
            held = socket.socket()
            held.bind((LOCAL, 0))
            held.listen(1)
            extra += ["--port", str(held.getsockname()[1])]
        try:
            code, output = run(
                *args, *extra, env={"LOAD_HOOK_MARKER": str(self.marker), **(env or {})}
            )
        finally:
            if held is not None:
                held.close()
        assert code == EXIT_USAGE, output
        line = error_line(output)
        assert "Traceback" not in output
        assert "cannot bind" not in output
        assert not self.log.exists(), "logging was set up: something started"
        assert not self.marker.exists(), "the pre-hook ran: something started"
        return line


@pytest.fixture
def refused(tmp_path):
    return Refusal(tmp_path)


def serve(procs, *args: str, port: int | None = None, **kw):
    """A running chaussette on 127.0.0.1:port that answered once."""
    port = port or free_port()
    proc = procs.chaussette("--port", str(port), *args, **kw)
    wait_http((LOCAL, port), proc)
    return proc, (LOCAL, port)


# -- commands --


def test_help_lists_every_option_and_exits_0():
    code, output = run("--help")
    assert code == EXIT_OK
    for opt in OPTIONS:
        for flag in opt.flags:
            assert flag in output, flag
    assert "CHAUSSETTE_" in output


def test_version():
    code, output = run("--version")
    assert code == EXIT_OK
    assert output.strip() == f"chaussette {__version__}"


def test_backends_prints_every_pair():
    code, output = run("--backends")
    assert code == EXIT_OK
    lines = output.strip().splitlines()
    assert lines[0].split()[:3] == ["protocol", "backend", "installed"]
    for info in registry.BACKENDS:
        row = [line for line in lines[1:] if line.split()[:2] == [info.protocol, info.name]]
        assert len(row) == 1, (info, output)
        installed = "yes" if info.installed() else "no"
        assert row[0].split()[2] == installed
        if info.extra:
            assert f"chaussette[{info.extra}]" in row[0]


# -- every classic flag, with its meaning --


def test_host_and_port(procs):
    proc, address = serve(procs, "--host", LOCAL, ROUTES_APP)
    assert http_request(address, "/").body == b"hello"
    assert f"http://{LOCAL}:{address[1]}" in proc.output()
    assert proc.stop() == EXIT_OK


def test_ipv6_host(procs):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port(socket.AF_INET6)
    proc = procs.chaussette("--host", "[::1]", "--port", str(port), ROUTES_APP)
    wait_http(("::1", port), proc)
    assert f"http://[::1]:{port}" in proc.output()
    with pytest.raises(OSError):  # bound on ::1 only
        connect((LOCAL, port), timeout=2).close()
    assert proc.stop() == EXIT_OK


def test_address_family_that_agrees_with_the_host(procs):
    port = free_port(socket.AF_INET6)
    proc = procs.chaussette(
        "--host", "::1", "--address-family", "AF_INET6", "--port", str(port), ROUTES_APP
    )
    wait_http(("::1", port), proc)
    assert proc.stop() == EXIT_OK
    proc, _ = serve(procs, "--host", LOCAL, "--address-family", "AF_INET", ROUTES_APP)
    assert proc.stop() == EXIT_OK


@pytest.mark.parametrize("how", ["--fd", "fd://"])
def test_fd(procs, how):
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        sock.listen(16)
        fd = sock.fileno()
        args = ["--fd", str(fd)] if how == "--fd" else ["--host", f"fd://{fd}"]
        proc = procs.chaussette(*args, ROUTES_APP, pass_fds=(fd,))
        wait_http(sock.getsockname(), proc)
        origin = f"from --fd {fd}" if how == "--fd" else f"from --host fd://{fd}"
        assert f"(fd {fd}, {origin})" in proc.output()
        assert proc.stop() == EXIT_OK


def test_backlog(procs):
    ss = require_peer("ss", "iproute2")
    proc, (_, port) = serve(procs, "--backlog", "7", ROUTES_APP)
    shown = subprocess.run(
        [ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    assert shown[0] == "LISTEN"
    assert shown[2] == "7"  # a listening socket's Send-Q is its backlog
    assert proc.stop() == EXIT_OK


def test_backend_protocol_and_socket_type(procs):
    proc, _ = serve(
        procs,
        "--backend",
        "wsgiref",
        "--protocol",
        "http",
        "--socket-type",
        "SOCK_STREAM",
        ROUTES_APP,
    )
    assert "with backend wsgiref" in proc.output()
    assert proc.stop() == EXIT_OK


def test_unix_socket_with_socket_mode(procs, short_tmp):
    path = short_tmp / "web.sock"
    proc = procs.chaussette("--host", f"unix:{path}", "--socket-mode", "600", ROUTES_APP)
    wait_http(str(path), proc)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert proc.stop() == EXIT_OK
    assert not path.exists()


def test_threads_bounds_concurrent_requests(procs):
    proc, address = serve(procs, "--threads", "1", ROUTES_APP)
    finished: list[str] = []
    with connect(address) as slow:
        slow.sendall(b"GET /stream?n=3&pause=0.3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        first = slow.recv(65536)  # the one thread is now busy with this response
        assert first.startswith(b"HTTP/1.1 200")

        def other() -> None:
            http_request(address, "/")
            finished.append("other")

        thread = threading.Thread(target=other)
        thread.start()
        rest = read_all(slow)
        finished.append("slow")
        thread.join(30)
    assert b"chunk 2" in first + rest
    assert finished == ["slow", "other"]  # the second request waited for the free thread
    assert proc.stop() == EXIT_OK


def test_graceful_timeout_cuts_what_is_still_running(procs):
    proc, address = serve(procs, "--graceful-timeout", "0.5", ROUTES_APP)
    with connect(address) as slow:
        slow.sendall(b"GET /stream?n=100&pause=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")  # in flight for 30 s
        proc.send(signal.SIGTERM)
        assert proc.wait(20) == EXIT_RUNTIME  # not 30 s: the timeout cut the request
    out = proc.output()
    assert "graceful timeout 0.5s" in out


def test_log_level(procs):
    proc, _ = serve(procs, "--log-level", "warning", ROUTES_APP)
    assert proc.stop() == EXIT_OK
    assert "[INFO]" not in proc.output()
    proc, _ = serve(procs, "--log-level", "debug", ROUTES_APP)
    assert proc.stop() == EXIT_OK
    assert "[INFO] chaussette" in proc.output()


def test_log_output(procs, tmp_path):
    log = tmp_path / "server.log"
    proc, _ = serve(procs, "--log-output", str(log), ROUTES_APP)
    assert proc.stop() == EXIT_OK
    assert "serving tests.apps.routes:application" in log.read_text()
    assert "serving" not in proc.output()


def test_log_config(procs, tmp_path):
    log = tmp_path / "custom.log"
    config = {
        "version": 1,
        "formatters": {"mine": {"format": "MINE %(levelname)s %(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(log), "formatter": "mine"}
        },
        "root": {"level": "INFO", "handlers": ["file"]},
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    proc, _ = serve(procs, "--log-config", str(path), ROUTES_APP)
    assert proc.stop() == EXIT_OK
    assert "MINE INFO chaussette" in log.read_text()


def test_access_log(procs, tmp_path):
    log = tmp_path / "access.log"
    proc, address = serve(procs, "--access-log", str(log), ROUTES_APP)
    http_request(address, "/big?size=10")
    assert proc.stop() == EXIT_OK
    lines = log.read_text().splitlines()
    assert any('"GET /big?size=10 HTTP/1.1" 200 10' in line for line in lines), lines


def test_no_access_log_by_default(procs):
    proc, address = serve(procs, ROUTES_APP)
    http_request(address, "/big?size=10")
    assert proc.stop() == EXIT_OK
    assert "/big?size=10" not in proc.output()


def test_pre_and_post_hooks(procs, tmp_path):
    marker = tmp_path / "hooks"
    port = free_port()
    proc, _ = serve(
        procs,
        "--pre-hook",
        f"{HOOKS}:pre",
        "--post-hook",
        f"{HOOKS}.post",
        ROUTES_APP,
        port=port,
        env=child_env({"LOAD_HOOK_MARKER": str(marker)}),
    )
    assert marker.read_text().splitlines() == [f"pre {ROUTES_APP} port={port}"]
    assert proc.stop() == EXIT_OK
    assert marker.read_text().splitlines() == [
        f"pre {ROUTES_APP} port={port}",
        f"post {ROUTES_APP}",
    ]


def test_failing_pre_hook_stops_startup(tmp_path):
    marker = tmp_path / "hooks"
    with socket.socket() as held:
        held.bind((LOCAL, 0))
        held.listen(1)
        code, output = run(
            "--port",
            str(held.getsockname()[1]),
            "--pre-hook",
            f"{HOOKS}:fail",
            ROUTES_APP,
            env={"LOAD_HOOK_MARKER": str(marker)},
        )
    assert code == EXIT_RUNTIME
    line = error_line(output)
    assert f"--pre-hook {HOOKS}:fail raised RuntimeError" in line
    hooks = TESTS / "apps" / "load_hooks.py"
    assert f'File "{hooks}"' in output  # the hook's own traceback
    assert "cannot bind" not in output  # it stopped before the socket
    assert marker.read_text() == "fail\n"


@pytest.mark.parametrize(
    ("flag", "spec", "fragment"),
    [
        ("--pre-hook", f"{HOOKS}:nope", "no attribute 'nope'"),
        ("--pre-hook", f"{HOOKS}:NOT_A_HOOK", "not a callable"),
        ("--post-hook", "load_nosuch_module.hook", "no module named 'load_nosuch_module'"),
        ("--post-hook", HOOKS, "names a module, not a callable"),
    ],
)
def test_hook_that_cannot_be_loaded_stops_startup(flag, spec, fragment):
    code, output = run("--port", "0", flag, spec, ROUTES_APP)
    assert code == EXIT_RUNTIME
    line = error_line(output)
    assert f"{flag} {spec}" in line
    assert fragment in line
    assert "serving" not in output  # a bad --post-hook is found before serving, not after


def test_use_reloader_restarts_on_change(procs, tmp_path):
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    module = code_dir / "load_reloaded.py"
    template = (
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n"
        "    return [b'{}']\n"
    )
    module.write_text(template.format("v1"))
    proc, address = serve(
        procs, "--use-reloader", "--python-path", str(code_dir), "load_reloaded", cwd=code_dir
    )
    assert http_request(address, "/").body == b"v1"
    proc.wait_for_output("reloader watching")
    before = module.stat()
    module.write_text(template.format("v2"))
    # Same size and same mtime as v1: the cached bytecode of v1 looks valid to Python, so
    # only the reloader dropping it brings v2 (an edit within the same second does this).
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    body = b""
    for _ in range(200):  # bounded: 200 x 0.1 s
        try:
            body = http_request(address, "/", timeout=5).body
        except OSError:
            pass
        if body == b"v2":
            break
        threading.Event().wait(0.1)
    assert body == b"v2", proc.output()
    assert proc.stop() == EXIT_OK


# -- the environment --


def test_environment_is_honoured(procs):
    port = free_port()
    env = child_env({"CHAUSSETTE_PORT": str(port), "CHAUSSETTE_APP": ROUTES_APP})
    proc = procs.chaussette(env=env)
    wait_http((LOCAL, port), proc)
    assert http_request((LOCAL, port), "/").body == b"hello"
    assert proc.stop() == EXIT_OK


def test_command_line_beats_environment(procs):
    env_port, cli_port = free_port(), free_port()
    env = child_env({"CHAUSSETTE_PORT": str(env_port), "CHAUSSETTE_APP": "load_nosuch_module"})
    proc, _ = serve(procs, ROUTES_APP, port=cli_port, env=env)
    with pytest.raises(OSError):
        connect((LOCAL, env_port), timeout=2).close()
    assert proc.stop() == EXIT_OK


def test_args_from_the_environment(procs):
    env = child_env({"CHAUSSETTE_ARGS": "one 'two words'"})
    proc, address = serve(procs, "tests.apps.load_pkg.web:create_app()", env=env)
    assert http_request(address, "/").body == b"create_app one two words"
    assert proc.stop() == EXIT_OK


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CHAUSSETTE_PORT", "abc"),
        ("CHAUSSETTE_THREADS", "0"),
        ("CHAUSSETTE_USE_RELOADER", "maybe"),
        ("CHAUSSETTE_LOG_LEVEL", "loud"),
        ("CHAUSSETTE_SOCKET_MODE", "999"),
    ],
)
def test_bad_environment_value_names_the_variable(refused, var, value):
    line = refused(ROUTES_APP, env={var: value})
    assert var in line
    assert value in line


# -- bad input on the command line --


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--port", "abc"], ["--port", "'abc'"]),
        (["--port", "70000"], ["--port", "70000"]),
        (["--port"], ["--port", "expected one argument"]),
        (["--threads", "0"], ["--threads", "0"]),
        (["--socket-mode", "999"], ["--socket-mode", "'999'"]),
        (["--backlog", "none"], ["--backlog", "'none'"]),
        (["--fd", "three"], ["--fd", "'three'"]),
        (["--graceful-timeout", "soon"], ["--graceful-timeout", "'soon'"]),
        (["--spawn", "0"], ["--spawn", "0"]),
        (["--log-level", "loud"], ["--log-level", "'loud'"]),
        (["--address-family", "AF_APPLETALK"], ["--address-family", "'AF_APPLETALK'"]),
        (["--socket-type", "SOCK_PACKET"], ["--socket-type", "'SOCK_PACKET'"]),
        (["--colour", "red"], ["--colour", "--help"]),
        (["-Z"], ["-Z"]),
        (["--backend", "load_nosuch"], ["--backend load_nosuch", "wsgiref"]),
        (["--protocol", "load_nosuch"], ["--protocol load_nosuch", "http"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None,
)
def test_bad_value_is_refused(refused, args, fragments):
    line = refused(ROUTES_APP, *args)
    for fragment in fragments:
        assert fragment in line


UNIX = "unix:/tmp/load-never-created.sock"


@pytest.mark.parametrize(
    ("args", "hold_port", "names"),
    [
        (["--fd", "3", "--host", LOCAL], False, ["--fd", "--host"]),
        (["--fd", "3", "--address-family", "AF_INET"], False, ["--fd", "--address-family"]),
        (["--fd", "3", "--socket-mode", "660"], False, ["--fd", "--socket-mode"]),
        (["--fd", "3"], True, ["--fd", "--port"]),
        (["--host", "fd://3"], True, ["--host fd://3", "--port"]),
        (["--host", UNIX], True, ["--host unix:", "--port"]),
        (["--socket-mode", "600"], True, ["--socket-mode", "--host"]),
        (["--backend", "wsgiref", "--spawn", "4"], True, ["--spawn", "--backend wsgiref"]),
        (["--backend", "wsgiref", "--no-monkey"], True, ["--no-monkey", "--backend wsgiref"]),
        (["--socket-type", "SOCK_DGRAM"], True, ["--socket-type SOCK_DGRAM", "--protocol http"]),
        (["--address-family", "AF_INET", "--host", "::1"], True, ["AF_INET", "--host ::1"]),
        (["--address-family", "AF_INET", "--host", "[::1]"], True, ["AF_INET", "--host [::1]"]),
        (["--address-family", "AF_INET6", "--host", LOCAL], True, ["AF_INET6", f"--host {LOCAL}"]),
        (["--address-family", "AF_UNIX"], True, ["--address-family AF_UNIX", "--host"]),
        (["--address-family", "AF_INET", "--host", UNIX], False, ["AF_INET", "--host unix:"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None,
)
def test_bad_combination_is_refused_before_anything_starts(refused, args, hold_port, names):
    line = refused(*args, ROUTES_APP, hold_port=hold_port)
    for name in names:
        assert name in line
    assert not Path(UNIX[len("unix:") :]).exists()


# A backend lacking every optional capability, added to the real registry for these tests:
# the check under test is settings.check(), which reads capabilities from the registry.
# (Process-level refusals are covered above; these need a backend without the capability.)
LIMITED = registry.BackendInfo(
    "limited", "http", "tests.nowhere:Server", "test-only backend", unix=False, threads=False
)


def _limited_and_real(what: str) -> list[registry.BackendInfo]:
    return [LIMITED, *(b for b in registry.BACKENDS if getattr(b, what) is False)]


@pytest.fixture
def with_limited(monkeypatch):
    monkeypatch.setattr(registry, "BACKENDS", (*registry.BACKENDS, LIMITED))


CAPABILITY_CASES = [
    ("threads", ["--threads", "4"], "--threads"),
    ("pool", ["--spawn", "4"], "--spawn"),
    ("monkey", ["--no-monkey"], "--no-monkey"),
    ("unix", ["--host", UNIX], "--host unix:"),
]


@pytest.mark.parametrize(
    ("what", "args", "flag"), CAPABILITY_CASES, ids=[c[0] for c in CAPABILITY_CASES]
)
def test_capability_refused_naming_both_options(with_limited, what, args, flag):
    for info in _limited_and_real(what):
        settings = parse_args(["--protocol", info.protocol, "--backend", info.name, *args])
        with pytest.raises(UsageError) as caught:
            check(settings)
        message = str(caught.value)
        assert flag in message and f"--backend {info.name}" in message, message
        assert "\n" not in message


def test_console_script_is_the_same_front_door(tmp_path):
    script = shutil.which("chaussette", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the chaussette console script is not installed in this environment")
    done = subprocess.run(
        [script, "--port", "abc"], env=child_env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == EXIT_USAGE
    assert error_line(done.stderr) == "chaussette: error: --port: expected an integer, got 'abc'"


def test_load_error_also_reaches_the_log_file(tmp_path):
    log = tmp_path / "server.log"
    code, output = run("--port", "0", "--log-output", str(log), "tests.apps.load_pkg.raises")
    assert code == 3
    line = error_line(output)
    text = log.read_text()
    assert "[ERROR] " + line[len("chaussette: error: ") :] in text
    assert 'load_pkg/raises.py", line' in text  # with the user's traceback
