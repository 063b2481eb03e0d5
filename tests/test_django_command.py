"""``python manage.py runchaussette``: a project made by the real ``django-admin
startproject``, with ``chaussette.contrib.django`` in INSTALLED_APPS, served for real."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Proc, child_env, free_port, require_module, wait_http
from tests.test_workers import wait_serving

require_module("django", "pip install django")

VIEWS = '''\
"""Added by tests/test_django_command.py after startproject."""

import os

from django.http import JsonResponse


def hello(request, name):
    return JsonResponse({
        "name": name,
        "pid": os.getpid(),
        "host": request.get_host(),
        "server_software": request.META.get("SERVER_SOFTWARE"),
        "settings": os.environ.get("DJANGO_SETTINGS_MODULE"),
    })
'''

URLS = """
# Added by tests/test_django_command.py after startproject.
from mysite import views  # noqa: E402

urlpatterns += [path("hello/<str:name>/", views.hello)]  # noqa: F821
"""

SETTINGS = """
# Added by tests/test_django_command.py after startproject.
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS += ["chaussette.contrib.django"]  # noqa: F821
"""


def django_admin() -> list[str]:
    script = Path(sys.executable).parent / "django-admin"
    if script.exists():
        return [str(script)]
    found = shutil.which("django-admin")
    return [found] if found else [sys.executable, "-m", "django"]


def project_env() -> dict[str, str]:
    env = child_env()
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("djcmd")
    done = subprocess.run(
        [*django_admin(), "startproject", "mysite", str(base)],
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    package = base / "mysite"
    (package / "views.py").write_text(VIEWS)
    with open(package / "urls.py", "a") as f:
        f.write(URLS)
    with open(package / "settings.py", "a") as f:
        f.write(SETTINGS)
    return base


def manage(project: Path, *args: str) -> list[str]:
    return [sys.executable, str(project / "manage.py"), *args]


def runchaussette(procs, project: Path, *args: str, env: dict[str, str] | None = None) -> Proc:
    return procs.start(
        manage(project, "runchaussette", *args), cwd=project, env=env or project_env()
    )


def run_to_end(project: Path, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        manage(project, *args),
        cwd=project,
        env=project_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout.decode(errors="replace")


def stop_cleanly(proc: Proc) -> str:
    code = proc.stop()
    output = proc.output()
    assert code == 0, output
    assert "stopped (exit 0)" in output, output
    assert "Traceback" not in output, output
    return output


def test_http_on_addr_port(procs, project) -> None:
    port = free_port()
    proc = runchaussette(procs, project, f"127.0.0.1:{port}")
    resp = wait_http(("127.0.0.1", port), proc, "/hello/w%C3%B6rld/")
    assert resp.status == 200, resp.raw
    data = json.loads(resp.body)
    assert data["name"] == "wörld"
    assert data["pid"] == proc.pid  # served by the command's own process
    assert data["settings"] == "mysite.settings"
    assert data["server_software"].startswith("chaussette/")
    output = stop_cleanly(proc)
    assert f"serving mysite.wsgi.application on http://127.0.0.1:{port}" in output


def test_chaussette_options_workers_and_gevent(procs, project) -> None:
    require_module("gevent", "pip install gevent")
    port = free_port()
    proc = runchaussette(
        procs,
        project,
        "--backend",
        "gevent",
        "--workers",
        "2",
        "--graceful-timeout",
        "5",
        str(port),
    )
    resp = wait_http(("127.0.0.1", port), proc, "/hello/x/")
    wait_serving(proc, 2)
    assert json.loads(resp.body)["pid"] != proc.pid  # a worker answered, not the master
    output = stop_cleanly(proc)
    assert output.count(" exited (exit 0)") == 2, output
    assert "with backend gevent" in output


def test_unix_socket_and_environment(procs, project, short_tmp) -> None:
    path = short_tmp / "dj.sock"
    env = project_env()
    env["CHAUSSETTE_BACKEND"] = "waitress"  # the environment counts, as for chaussette
    proc = runchaussette(procs, project, "--socket-mode", "660", f"unix:{path}", env=env)
    resp = wait_http(str(path), proc, "/hello/unix/", timeout=30)
    assert resp.status == 200, resp.raw
    assert json.loads(resp.body)["host"] == "localhost"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    output = stop_cleanly(proc)
    assert "with backend waitress" in output
    assert not path.exists()


def test_help_lists_every_registry_option(project) -> None:
    from chaussette.contrib.django.management.commands.runchaussette import options

    code, output = run_to_end(project, "help", "runchaussette")
    assert code == 0, output
    for opt in options():
        assert opt.flags[-1] in output, opt.name
    assert "ADDR:PORT" in output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--backend", "nope", "8000"], 2, "chaussette: error: --backend nope: unknown"),
        (["127.0.0.1:abc"], 2, "chaussette: error: --port: expected an integer, got 'abc'"),
        (["--workers", "2", "--use-reloader"], 2, "--workers and --use-reloader cannot"),
        (["--port", "8000", "127.0.0.1:9000"], 1, "ADDR:PORT and --port cannot be used"),
        (["just-a-host"], 1, "'just-a-host' is not PORT, ADDR:PORT"),
        (["--timeout", "-1"], 2, "--timeout: must not be negative"),
    ],
)
def test_bad_arguments(project, args, code, message) -> None:
    got, output = run_to_end(project, "runchaussette", *args)
    assert got == code, output
    assert message in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("backend", [None, "gevent"])
def test_fastcgi(procs, project, backend) -> None:
    from tests.fcgi_client import fcgi_get

    port = free_port()
    extra = ["--backend", backend] if backend else []  # none: the protocol's first engine
    proc = runchaussette(procs, project, "--protocol", "fastcgi", *extra, f"127.0.0.1:{port}")
    proc.wait_for_output("serving mysite.wsgi.application on")
    result = fcgi_get(("127.0.0.1", port), "/hello/fcgi/", HTTP_HOST="localhost")
    status, headers, body = result.cgi()
    assert status == 200, result
    assert headers["content-type"] == "application/json"
    data = json.loads(body)
    assert data["name"] == "fcgi"
    assert data["pid"] == proc.pid
    output = stop_cleanly(proc)
    assert f"with backend {backend or 'threads'}" in output


def test_scgi_with_workers(procs, project) -> None:
    from tests.fcgi_client import parse_cgi, scgi_request

    port = free_port()
    proc = runchaussette(procs, project, "--protocol", "scgi", "--workers", "2", str(port))
    wait_serving(proc, 2)
    raw = scgi_request(("127.0.0.1", port), "/hello/scgi/", HTTP_HOST="localhost")
    status, _, body = parse_cgi(raw)
    assert status == 200, raw
    assert json.loads(body)["pid"] != proc.pid  # a worker answered
    output = stop_cleanly(proc)
    assert output.count(" exited (exit 0)") == 2, output
