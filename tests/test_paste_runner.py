"""PasteDeploy server runners (egg:chaussette#main, #fastcgi, #scgi), started for real.

Each test writes an ini file whose [app:main] is ``app_factory`` below and starts it either
with pyramid's ``pserve`` or with ``python -c`` calling ``paste.deploy.loadserver`` and
``loadapp`` (which keeps the runner's exit code: pserve turns SystemExit into exit 0).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    Proc,
    child_env,
    free_port,
    http_request,
    require_module,
    wait_http,
)
from tests.test_workers import wait_serving

require_module("paste.deploy", "pip install PasteDeploy")

PSERVE = Path(sys.executable).parent / "pserve"
LOAD = (
    "import sys\n"
    "from paste.deploy import loadapp, loadserver\n"
    "uri = 'config:' + sys.argv[1]\n"
    "loadserver(uri)(loadapp(uri))\n"
)


def app_factory(global_conf, **local):
    """[app:main] use = call:tests.test_paste_runner:app_factory"""
    label = local.get("label", "paste app")

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/pid":
            body = str(os.getpid())
        elif path == "/patched":
            monkey = sys.modules.get("gevent.monkey")
            body = json.dumps(
                {m: bool(monkey and monkey.is_module_patched(m)) for m in ("socket", "threading")}
            )
        else:
            body = f"{label} at {path} via {environ.get('SERVER_SOFTWARE', '?')}"
        data = body.encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))]
        )
        return [data]

    return app


def write_ini(tmp_path: Path, server: str, use: str = "egg:chaussette#main") -> Path:
    ini = tmp_path / "site.ini"
    ini.write_text(
        "[app:main]\n"
        "use = call:tests.test_paste_runner:app_factory\n"
        "label = hello from %(here)s\n"
        "\n"
        "[server:main]\n"
        f"use = {use}\n"
        f"{server}\n"
    )
    return ini


def pserve(procs, ini: Path) -> Proc:
    if not PSERVE.exists():
        pytest.skip("pserve not installed (pip install pyramid)")
    return procs.start([str(PSERVE), str(ini)])


def load(procs, ini: Path) -> Proc:
    return procs.start([sys.executable, "-c", LOAD, str(ini)])


def run_to_end(ini: Path, tmp_path: Path) -> tuple[int, str]:
    proc = Proc([sys.executable, "-c", LOAD, str(ini)], log_dir=tmp_path, env=child_env())
    try:
        code = proc.wait(30)
    finally:
        proc.stop(signal.SIGKILL)
    return code, proc.output()


def stop_cleanly(proc: Proc) -> str:
    code = proc.stop()
    output = proc.output()
    assert code == 0, output
    assert "stopped (exit 0)" in output, output
    assert "Traceback" not in output, output
    return output


def test_pserve_http_main(procs, tmp_path) -> None:
    port = free_port()
    ini = write_ini(
        tmp_path, f"host = 127.0.0.1\nport = {port}\nbackend = waitress\ngraceful_timeout = 5"
    )
    proc = pserve(procs, ini)
    resp = wait_http(("127.0.0.1", port), proc, "/x")
    assert resp.status == 200
    assert resp.body == f"hello from {tmp_path} at /x via waitress".encode()
    output = stop_cleanly(proc)
    assert f"serving paste:{ini} on http://127.0.0.1:{port}" in output
    assert "with backend waitress" in output


def test_unix_socket_with_mode_and_settings_by_name(procs, tmp_path, short_tmp) -> None:
    path = short_tmp / "p.sock"
    ini = write_ini(
        tmp_path,
        f"socket = {path}\nsocket_mode = 666\nthreads = 2\nlog-level = debug\naccess_log = -",
    )
    proc = load(procs, ini)
    assert wait_http(str(path), proc, "/unix").body.startswith(b"hello from")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    proc.wait_for_output('"GET /unix HTTP/1.1" 200')  # access_log = - reached the log
    stop_cleanly(proc)
    assert not path.exists()  # the runner bound it, the runner removed it


@pytest.mark.parametrize(
    ("switches", "expected"),
    [
        ("", {"socket": True, "threading": True}),
        ("gevent.monkey.patch_thread = false", {"socket": True, "threading": False}),
        ("patch_thread = off\npatch_socket = false", {"socket": False, "threading": False}),
    ],
)
def test_gevent_monkey_switches(procs, tmp_path, switches, expected) -> None:
    require_module("gevent", "pip install gevent")
    port = free_port()
    ini = write_ini(tmp_path, f"port = {port}\nbackend = gevent\n{switches}")
    proc = load(procs, ini)
    resp = wait_http(("127.0.0.1", port), proc, "/patched")
    assert json.loads(resp.body) == expected, proc.output()
    output = stop_cleanly(proc)
    assert ("gevent.monkey.patch_all(" in output) == bool(switches), output


def test_num_workers(procs, tmp_path) -> None:
    port = free_port()
    ini = write_ini(tmp_path, f"port = {port}\nnum_workers = 2\nthreads = 1")
    proc = load(procs, ini)
    wait_http(("127.0.0.1", port), proc, "/pid")
    wait_serving(proc, 2)
    seen = {int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()}
    assert len(seen) == 2, proc.output()
    pid = int(http_request(("127.0.0.1", port), "/pid").body)
    assert pid in seen
    output = stop_cleanly(proc)
    for child in seen:
        assert f"worker {child} exited (exit 0)" in output


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (
            "port = 1\nbogus = 1\nalso_bogus = x",
            "unknown key(s) bogus, also_bogus; known: socket, num_workers",
        ),
        ("port = abc", "port: expected an integer, got 'abc'"),
        ("socket = /tmp/x.sock\nhost = 127.0.0.1", "socket and host cannot be used together"),
        ("app = tests.apps.routes:application", "the application comes from the ini file"),
        (
            "backend = wsgiref\npatch_thread = false",
            "gevent.monkey.patch_thread applies only to a gevent backend, not backend = wsgiref",
        ),
        ("backend = gevent\npatch_nothing = false", "gevent.monkey.patch_all() has no nothing"),
        ("backend = gevent\npatch_thread = maybe", "expected a boolean (true/false), got 'maybe'"),
        ("backend = nope", "--backend nope: unknown for --protocol http"),
        ("workers = 2\nuse_reloader = true", "--workers and --use-reloader cannot be used"),
    ],
)
def test_bad_sections_fail_with_one_line(tmp_path, server, message) -> None:
    code, output = run_to_end(write_ini(tmp_path, server), tmp_path)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("chaussette: error: "), output
    assert message in lines[0], output


def test_protocol_disagreeing_with_the_entry_point(tmp_path) -> None:
    code, output = run_to_end(
        write_ini(tmp_path, "protocol = http", use="egg:chaussette#fastcgi"), tmp_path
    )
    assert code == 2, output
    assert "protocol = http disagrees with egg:chaussette#fastcgi" in output


def test_entry_points_are_installed() -> None:
    from importlib.metadata import entry_points

    from chaussette import paste

    found = {
        ep.name: ep.load()
        for ep in entry_points(group="paste.server_runner")
        if ep.value.startswith("chaussette.")
    }
    assert found == {"main": paste.run_http, "fastcgi": paste.run_fastcgi, "scgi": paste.run_scgi}
    assert (ROOT / "chaussette" / "paste.py").is_file()


def test_pserve_fastcgi_on_a_unix_socket(procs, tmp_path, short_tmp) -> None:
    from tests.fcgi_client import fcgi_get

    path = short_tmp / "f.sock"
    ini = write_ini(tmp_path, f"socket = {path}\nsocket_mode = 600", use="egg:chaussette#fastcgi")
    proc = pserve(procs, ini)
    proc.wait_for_output("serving paste:")
    result = fcgi_get(str(path), "/via/fcgi?x=1")
    status, _, body = result.cgi()
    assert status == 200, result
    assert body.startswith(f"hello from {tmp_path} at /via/fcgi via ".encode()), body
    assert result.app_status == 0
    output = stop_cleanly(proc)
    assert "with backend threads" in output
    assert not path.exists()


@pytest.mark.parametrize("backend", ["threads", "gevent"])
def test_fastcgi_with_workers_and_gevent_switches(procs, tmp_path, backend) -> None:
    from tests.fcgi_client import fcgi_get

    require_module("gevent", "pip install gevent")
    port = free_port()
    switches = "gevent.monkey.patch_thread = false" if backend == "gevent" else ""
    ini = write_ini(
        tmp_path,
        f"port = {port}\nbackend = {backend}\nnum_workers = 2\nmax_conns = 50\n{switches}",
        use="egg:chaussette#fastcgi",
    )
    proc = load(procs, ini)
    wait_serving(proc, 2)
    result = fcgi_get(("127.0.0.1", port), "/patched")
    status, _, body = result.cgi()
    assert status == 200, result
    patched = {"socket": backend == "gevent", "threading": False}
    assert json.loads(body) == patched
    pid = int(fcgi_get(("127.0.0.1", port), "/pid").cgi()[2])
    assert pid != proc.pid  # a worker answered
    output = stop_cleanly(proc)
    assert output.count(" exited (exit 0)") == 2, output


def test_scgi(procs, tmp_path) -> None:
    from tests.fcgi_client import parse_cgi, scgi_request

    port = free_port()
    ini = write_ini(tmp_path, f"port = {port}", use="egg:chaussette#scgi")
    proc = load(procs, ini)
    proc.wait_for_output("serving paste:")
    status, _, body = parse_cgi(scgi_request(("127.0.0.1", port), "/s"))
    assert status == 200
    assert body.startswith(f"hello from {tmp_path} at /s via ".encode())
    output = stop_cleanly(proc)
    assert "with backend threads" in output


def test_cgi_fcgi_client(procs, tmp_path) -> None:
    """cgi-fcgi (libfcgi), an independent FastCGI client, against egg:chaussette#fastcgi."""
    import subprocess

    from tests.conftest import require_peer

    cgi_fcgi = require_peer("cgi-fcgi", "libfcgi-bin")
    port = free_port()
    ini = write_ini(tmp_path, f"port = {port}", use="egg:chaussette#fastcgi")
    proc = load(procs, ini)
    proc.wait_for_output("serving paste:")
    env = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/from/libfcgi",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    done = subprocess.run(
        [cgi_fcgi, "-bind", "-connect", f"127.0.0.1:{port}"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done
    assert b"Status: 200" in done.stdout, done.stdout
    assert f"hello from {tmp_path} at /from/libfcgi via ".encode() in done.stdout
    stop_cleanly(proc)
