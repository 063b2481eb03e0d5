"""Real frameworks served by real chaussette processes: Flask, Django, Pyramid (paste:).

Each server is started once per module (a framework import costs more than all its
requests) and must stop cleanly (exit 0) at the end. The Django project is made by the real
``django-admin startproject`` at test time, then given a view and urls.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from tests.conftest import (
    ROOT,
    HTTPResponse,
    Proc,
    chaussette_cmd,
    child_env,
    connect,
    free_port,
    http_request,
    parse_response,
    read_all,
    wait_http,
)

pytest.importorskip("flask")
pytest.importorskip("django")
pytest.importorskip("pyramid")
pytest.importorskip("paste.deploy")

PYRAMID_INI = "tests/apps/fw_pyramid.ini"
# Anything of these in a server's output means a framework or the validator complained.
BAD_OUTPUT = ("WSGIWarning", "Exception ignored", "AssertionError")


class Server:
    """A chaussette process serving one app on a loopback TCP port."""

    def __init__(self, proc: Proc, port: int) -> None:
        self.proc = proc
        self.port = port
        self.address = ("127.0.0.1", port)
        self.host = f"127.0.0.1:{port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> HTTPResponse:
        return http_request(self.address, path, headers={"Host": self.host, **(headers or {})})

    def post(
        self, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> HTTPResponse:
        hdrs = {"Host": self.host, "Content-Type": content_type, **(headers or {})}
        return http_request(self.address, path, "POST", body, hdrs)

    def json(self, resp: HTTPResponse, status: int = 200) -> dict:
        assert resp.status == status, (resp.raw[:2000], self.proc.output()[-3000:])
        assert (resp.header("content-type") or "").startswith("application/json"), resp.raw
        return json.loads(resp.body)  # type: ignore[no-any-return]


@contextlib.contextmanager
def serving(
    *args: str, log_dir: Path, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> Iterator[Server]:
    port = free_port()
    proc = Proc(
        chaussette_cmd("--port", str(port), *args),
        cwd=cwd,
        env=env if env is not None else child_env(),
        log_dir=log_dir,
    )
    try:
        wait_http(("127.0.0.1", port), proc)
        yield Server(proc, port)
    except BaseException:
        proc.stop(signal.SIGKILL)
        raise
    code = proc.stop()
    output = proc.log_path.read_text(errors="replace")
    assert code == 0, f"exit {code}:\n{output}"
    assert "stopped (exit 0)" in output, output
    for bad in BAD_OUTPUT:
        assert bad not in output, output


def multipart(
    fields: list[tuple[str, str]],
    files: list[tuple[str, str, bytes]],
    boundary: str = "chs-boundary-1234",
) -> tuple[bytes, str]:
    parts = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, filename, content in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: text/plain\r\n\r\n'.encode()
            + content
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def raw_exchange(address: tuple[str, int], request: bytes) -> HTTPResponse:
    with connect(address) as sock:
        sock.sendall(request)
        return parse_response(read_all(sock))


# --------------------------------------------------------------------------- Flask


@pytest.fixture(scope="module", params=["app", "validated_app"])
def flask_server(request, tmp_path_factory) -> Iterator[Server]:
    env = child_env()
    if request.param == "validated_app":
        # a stdlib validator warning becomes an exception inside the app, hence a 500
        env["PYTHONWARNINGS"] = "error::wsgiref.validate.WSGIWarning"
    with serving(
        f"tests.apps.fw_flask:{request.param}", log_dir=tmp_path_factory.mktemp("flask"), env=env
    ) as server:
        yield server


def test_flask_query_string(flask_server: Server) -> None:
    raw = "q=caf%C3%A9+au+lait&tag=a&tag=b%26c&empty="
    data = flask_server.json(flask_server.get(f"/search?{raw}"))
    assert data == {"q": "café au lait", "tags": ["a", "b&c"], "raw": raw}


def test_flask_path_is_decoded_as_utf8(flask_server: Server) -> None:
    resp = flask_server.get("/hello/" + quote("été à Zürich"))
    assert resp.status == 200, resp.raw
    assert resp.body.decode("utf-8") == "hello été à Zürich"
    assert resp.header("content-length") == str(len(resp.body))


def test_flask_head_has_headers_and_no_body(flask_server: Server) -> None:
    get = flask_server.get("/hello/head")
    resp = http_request(
        flask_server.address, "/hello/head", "HEAD", headers={"Host": flask_server.host}
    )
    assert resp.status == 200
    assert resp.header("content-length") == get.header("content-length") == str(len(get.body))
    assert resp.body == b""


def test_flask_urlencoded_form(flask_server: Server) -> None:
    body = urlencode([("name", "René"), ("colors", "red"), ("colors", "blue")]).encode()
    data = flask_server.json(flask_server.post("/form", body, "application/x-www-form-urlencoded"))
    assert data == {
        "fields": {"name": ["René"], "colors": ["red", "blue"]},
        "upload": None,
        "content_type": "application/x-www-form-urlencoded",
    }


def test_flask_multipart_upload(flask_server: Server) -> None:
    content = "first line\nsecond line é\n".encode() * 2000  # ~56 KB: several reads
    body, ctype = multipart([("title", "notes")], [("upload", "notes.txt", content)])
    data = flask_server.json(flask_server.post("/form", body, ctype))
    assert data["fields"] == {"title": ["notes"]}
    assert data["upload"] == {"filename": "notes.txt", "content": content.decode()}
    assert data["content_type"] == "multipart/form-data"


def test_flask_chunked_request_body(flask_server: Server) -> None:
    body = urlencode([("a", "1"), ("b", "deux")]).encode()
    chunked = b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:])
    resp = raw_exchange(
        flask_server.address,
        (
            f"POST /form HTTP/1.1\r\nHost: {flask_server.host}\r\nConnection: close\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + chunked,
    )
    assert flask_server.json(resp)["fields"] == {"a": ["1"], "b": ["deux"]}


def test_flask_json_round_trip(flask_server: Server) -> None:
    payload = {"a": 1, "list": [1, 2, {"x": None}], "text": "naïve ☃"}
    body = json.dumps(payload).encode()
    data = flask_server.json(flask_server.post("/json", body, "application/json"))
    assert data == {"received": payload, "keys": 3, "method": "POST"}


def test_flask_404(flask_server: Server) -> None:
    resp = flask_server.get("/no/such/page")
    assert resp.status == 404
    assert resp.reason == "NOT FOUND"
    assert (resp.header("content-type") or "").startswith("text/html")
    assert b"Not Found" in resp.body
    assert b"requested URL was not found" in resp.body


def test_flask_view_error_is_a_500_and_server_goes_on(flask_server: Server) -> None:
    resp = flask_server.get("/boom")
    assert resp.status == 500
    assert b"Internal Server Error" in resp.body
    assert flask_server.get("/hello/after").body == b"hello after"
    flask_server.proc.wait_for_output("RuntimeError: boom from the flask view")


def test_flask_url_for_uses_the_host_header(flask_server: Server) -> None:
    port = flask_server.port
    data = flask_server.json(flask_server.get("/url?x=1"))
    assert data == {
        "external": f"http://127.0.0.1:{port}/hello/x%20y",
        "host_url": f"http://127.0.0.1:{port}/",
        "url": f"http://127.0.0.1:{port}/url?x=1",
    }
    other = flask_server.json(flask_server.get("/url", headers={"Host": "app.example:8443"}))
    assert other["external"] == "http://app.example:8443/hello/x%20y"


def test_flask_url_for_without_host_header_uses_server_name_and_port(flask_server: Server) -> None:
    # HTTP/1.0 without Host: Werkzeug falls back on SERVER_NAME and SERVER_PORT
    resp = raw_exchange(flask_server.address, b"GET /url HTTP/1.0\r\n\r\n")
    data = flask_server.json(resp)
    assert data["host_url"] == f"http://127.0.0.1:{flask_server.port}/"
    assert data["external"] == f"http://127.0.0.1:{flask_server.port}/hello/x%20y"


def test_flask_stream_with_context_is_not_buffered(flask_server: Server, tmp_path) -> None:
    gate = tmp_path / "gate"
    path = f"/stream?n=4&gate={quote(str(gate))}"
    with connect(flask_server.address) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {flask_server.host}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        received = b""
        deadline = time.monotonic() + 10
        while b"line 0 of 4" not in received and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        # the first line arrived while the generator was still waiting on the gate
        assert b"line 0 of 4 for /stream\n" in received, received
        assert b"line 1" not in received
        gate.write_text("open")
        received += read_all(sock)
    resp = parse_response(received)
    assert resp.status == 200
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.body == b"".join(b"line %d of 4 for /stream\n" % i for i in range(4))


# --------------------------------------------------------------------------- Django

DJANGO_VIEWS = '''\
"""Added by tests/test_frameworks.py after startproject."""

import json
import os

from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt


def hello(request, name):
    return JsonResponse({
        "name": name,
        "get": {k: request.GET.getlist(k) for k in request.GET},
        "host": request.get_host(),
        "absolute": request.build_absolute_uri("/hello/abs/"),
        "settings": os.environ.get("DJANGO_SETTINGS_MODULE"),
        "server_software": request.META.get("SERVER_SOFTWARE"),
    })


@csrf_exempt
def echo(request):
    body = request.body
    return JsonResponse({
        "method": request.method,
        "body_length": len(body),
        "content_type": request.content_type,
        "post": {k: request.POST.getlist(k) for k in request.POST},
        "json": json.loads(body) if request.content_type == "application/json" else None,
    })


def protected(request):
    return HttpResponse("csrf protected view reached")
'''

DJANGO_URLS = """
# Added by tests/test_frameworks.py after startproject.
from mysite import views  # noqa: E402

urlpatterns += [  # noqa: F821
    path("hello/<str:name>/", views.hello),  # noqa: F821
    path("echo/", views.echo),  # noqa: F821
    path("protected/", views.protected),  # noqa: F821
]
"""

DJANGO_SETTINGS = """
# Added by tests/test_frameworks.py after startproject.
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
"""


def django_admin() -> list[str]:
    script = Path(sys.executable).parent / "django-admin"
    if script.exists():
        return [str(script)]
    found = shutil.which("django-admin")
    return [found] if found else [sys.executable, "-m", "django"]


@pytest.fixture(scope="module")
def django_project(tmp_path_factory) -> Path:
    """A project made by the real ``django-admin startproject mysite``, plus one app view."""
    base = tmp_path_factory.mktemp("django")
    env = child_env()
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [*django_admin(), "startproject", "mysite", str(base)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    package = base / "mysite"
    assert (package / "wsgi.py").is_file() and (package / "settings.py").is_file()
    (package / "views.py").write_text(DJANGO_VIEWS)
    with open(package / "urls.py", "a") as f:
        f.write(DJANGO_URLS)
    with open(package / "settings.py", "a") as f:
        f.write(DJANGO_SETTINGS)
    return base


# How each way of naming the project is started: (APP, run from the project dir?)
DJANGO_WAYS = {
    "wsgi-module": ("mysite.wsgi", False),  # --python-path PROJECT, run from the repo
    "settings-module": ("mysite.settings", True),  # the project dir is the cwd
    "project-package": ("mysite", False),
}


@pytest.fixture(scope="module", params=list(DJANGO_WAYS))
def django_server(request, django_project: Path, tmp_path_factory) -> Iterator[Server]:
    app, from_project_dir = DJANGO_WAYS[request.param]
    env = child_env()
    env.pop("DJANGO_SETTINGS_MODULE", None)
    if from_project_dir:
        args, cwd = [app], django_project
    else:
        args, cwd = ["--python-path", str(django_project), app], ROOT
    with serving(*args, cwd=cwd, env=env, log_dir=tmp_path_factory.mktemp("dj")) as server:
        assert f"serving {app} on" in server.proc.output()
        yield server


def test_django_view(django_server: Server) -> None:
    port = django_server.port
    data = django_server.json(django_server.get("/hello/w%C3%B6rld/?a=1&a=2&b=%C3%A9"))
    assert data == {
        "name": "wörld",
        "get": {"a": ["1", "2"], "b": ["é"]},
        "host": f"127.0.0.1:{port}",
        "absolute": f"http://127.0.0.1:{port}/hello/abs/",
        "settings": "mysite.settings",
        "server_software": data["server_software"],
    }
    assert data["server_software"].startswith("chaussette/")


def test_django_404_and_disallowed_host(django_server: Server) -> None:
    missing = django_server.get("/no/such/page/")
    assert missing.status == 404
    assert b"Not Found" in missing.body
    # DEBUG = False and ALLOWED_HOSTS is enforced on the Host header chaussette passed on
    evil = django_server.get("/hello/x/", headers={"Host": "evil.example"})
    assert evil.status == 400
    assert b"Bad Request" in evil.body


def test_django_admin_login_page(django_server: Server) -> None:
    resp = django_server.get("/admin/login/")
    assert resp.status == 200, resp.raw[:2000]
    page = resp.body.decode()
    assert "<title>Log in | Django site admin</title>" in page
    assert 'name="csrfmiddlewaretoken"' in page
    assert 'name="username"' in page and 'name="password"' in page
    # Django's handler emits " csrftoken=..." (cookie.output(header="")): OWS, still valid
    cookies = [v.strip() for k, v in resp.headers if k.lower() == "set-cookie"]
    assert any(c.startswith("csrftoken=") for c in cookies), repr(resp.raw[:1500])
    # the admin index redirects an anonymous user to that page
    index = django_server.get("/admin/")
    assert index.status == 302
    assert index.header("location") == "/admin/login/?next=/admin/"


def test_django_csrf_exempt_post_echoes_data(django_server: Server) -> None:
    body = urlencode([("title", "Grüße"), ("tags", "x"), ("tags", "y")]).encode()
    data = django_server.json(
        django_server.post("/echo/", body, "application/x-www-form-urlencoded")
    )
    assert data == {
        "method": "POST",
        "body_length": len(body),
        "content_type": "application/x-www-form-urlencoded",
        "post": {"title": ["Grüße"], "tags": ["x", "y"]},
        "json": None,
    }
    payload = {"n": 3, "items": ["a", "b"]}
    raw = json.dumps(payload).encode()
    data = django_server.json(django_server.post("/echo/", raw, "application/json"))
    assert data["json"] == payload
    assert data["body_length"] == len(raw)


def test_django_csrf_still_guards_other_views(django_server: Server) -> None:
    resp = django_server.post("/protected/", b"a=1", "application/x-www-form-urlencoded")
    assert resp.status == 403
    assert b"CSRF verification failed" in resp.body
    assert django_server.get("/protected/").body == b"csrf protected view reached"


# --------------------------------------------------------------------------- Pyramid


@pytest.fixture(scope="module")
def pyramid_main(tmp_path_factory) -> Iterator[Server]:
    """paste:RELATIVE.ini from the repo root (the cwd puts tests.apps on the path)."""
    with serving(f"paste:{PYRAMID_INI}", log_dir=tmp_path_factory.mktemp("pyr")) as server:
        yield server


def test_pyramid_route_matchdict_json(pyramid_main: Server) -> None:
    data = pyramid_main.json(pyramid_main.get("/hello/" + quote("Zoë")))
    assert data == {
        "app_name": "main",
        "greeting": "hello",
        "matchdict": {"name": "Zoë"},
        "message": "hello, Zoë",
    }


def test_pyramid_typed_route_and_params(pyramid_main: Server) -> None:
    data = pyramid_main.json(pyramid_main.get("/items/42/the-answer?x=1&x=2&y=%C3%A7a"))
    assert data == {
        "app_name": "main",
        "greeting": "hello",
        "id": 42,
        "slug": "the-answer",
        "params": {"x": ["1", "2"], "y": "ça"},
    }
    resp = pyramid_main.get("/items/not-a-number/slug")
    assert resp.status == 404
    assert b"404 Not Found" in resp.body


def test_pyramid_post_form(pyramid_main: Server) -> None:
    body = urlencode([("k", "v"), ("multi", "1"), ("multi", "2"), ("u", "ñ")]).encode()
    data = pyramid_main.json(pyramid_main.post("/form", body, "application/x-www-form-urlencoded"))
    assert data["post"] == {"k": "v", "multi": ["1", "2"], "u": "ñ"}
    assert data["content_length"] == len(body)
    assert pyramid_main.get("/form").status == 404  # the route is POST only


def test_pyramid_urls_and_ini_location(pyramid_main: Server) -> None:
    port = pyramid_main.port
    data = pyramid_main.json(pyramid_main.get("/where"))
    assert data["application_url"] == f"http://127.0.0.1:{port}"
    assert data["route_url"] == f"http://127.0.0.1:{port}/items/7/seven"
    assert data["here"] == str(ROOT / "tests" / "apps")  # %(here)s of the ini file


def test_pyramid_named_section_from_elsewhere(tmp_path, tmp_path_factory) -> None:
    """paste:ABSOLUTE.ini#other, run from an unrelated dir with the repo on --python-path."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in env["PYTHONPATH"].split(os.pathsep) if p and Path(p).resolve() != ROOT
    )
    ini = ROOT / PYRAMID_INI
    with serving(
        "--python-path",
        str(ROOT),
        f"paste:{ini}#other",
        cwd=tmp_path,
        env=env,
        log_dir=tmp_path_factory.mktemp("pyr"),
    ) as server:
        data = server.json(server.get("/hello/bob"))
        assert data == {
            "app_name": "other",
            "greeting": "bonjour",
            "matchdict": {"name": "bob"},
            "message": "bonjour, bob",
        }
        assert server.json(server.get("/where"))["here"] == str(ini.parent)


def test_pyramid_unknown_section_is_an_app_load_error(tmp_path) -> None:
    proc = Proc(
        chaussette_cmd("--port", str(free_port()), f"paste:{PYRAMID_INI}#nope"), log_dir=tmp_path
    )
    try:
        code = proc.wait(30)
    finally:
        proc.stop(signal.SIGKILL)
    output = proc.log_path.read_text(errors="replace")
    assert code == 3, output
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"chaussette: error: paste:{PYRAMID_INI}#nope:"), output
    assert "nope" in last.split(":", 3)[-1], output
