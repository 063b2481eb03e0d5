"""Real nginx in front of chaussette's FastCGI server, on every engine.

One chaussette (``--protocol fastcgi``) per engine and transport (TCP, unix socket with
``--socket-mode 666``: as root, nginx's workers run as ``nobody``), one nginx in front with
two servers:

- ``keep``: an upstream with ``keepalive 8`` and ``fastcgi_keep_conn on``, so nginx reuses
  its connections to chaussette;
- ``close``: ``fastcgi_keep_conn off``, so chaussette must close after each END_REQUEST
  (or nginx waits for the close and the client times out).

Each server passes ``/`` buffered (nginx's default) and ``/unbuffered/...`` with
``fastcgi_buffering off``. The app is tests/apps/gateway_app.py: routes.py inside
``wsgiref.validate.validator``, so an environ nginx's params would make invalid (its
``HTTP_CONTENT_TYPE``/``HTTP_CONTENT_LENGTH`` copies) shows up as a 500.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.apps.gateway_app import FIRST, SECOND
from tests.conftest import Conn, HTTPResponse, http_request, request_bytes, require_peer
from tests.nginx import FASTCGI_PARAMS, GatewayStack, fastcgi_location

ENGINES = ("threads", "gevent", "eventlet")
TRANSPORTS = ("tcp", "unix")
SERVERS = ("keep", "close")
PREFIXES = ("", "/unbuffered")  # buffered (the default) and fastcgi_buffering off


def _locations(keep: bool) -> str:
    upstream = "keep" if keep else "close"
    return (
        fastcgi_location("/", upstream, keep_conn=keep)
        + fastcgi_location(
            "/unbuffered/", upstream, keep_conn=keep, buffering=False, strip="/unbuffered"
        )
        + fastcgi_location("/stock/", upstream, keep_conn=keep, stock_params=True)
        + _mounted("/app", upstream, keep)
    )


def _mounted(prefix: str, upstream: str, keep: bool) -> str:
    """The app mounted under ``prefix``, as docs/deployment/nginx-fastcgi.rst shows it."""
    return f"""
        location {prefix}/ {{
            include {FASTCGI_PARAMS};
            fastcgi_split_path_info ^({prefix})(/.*)$;
            fastcgi_param PATH_INFO $fastcgi_path_info;
            fastcgi_keep_conn {"on" if keep else "off"};
            fastcgi_pass {upstream};
        }}
"""


@pytest.fixture(
    scope="module",
    params=[(e, t) for e in ENGINES for t in TRANSPORTS],
    ids=[f"{e}-{t}" for e in ENGINES for t in TRANSPORTS],
)
def stack(request: pytest.FixtureRequest) -> Iterator[GatewayStack]:
    nginx = require_peer("nginx", "nginx")
    engine, transport = request.param
    servers = {"keep": _locations(True), "close": _locations(False)}
    gateway = GatewayStack(nginx, "fastcgi", engine, transport, servers)
    try:
        yield gateway
    finally:
        code = gateway.close()
    assert code == 0, f"chaussette exited {code} after SIGTERM:\n{gateway.logs()}"


def _get(stack: GatewayStack, server: str, path: str, **kw: object) -> HTTPResponse:
    try:
        return http_request(stack.address(server), path, **kw)  # type: ignore[arg-type]
    except (OSError, AssertionError) as exc:
        raise AssertionError(f"{path}: {exc}\n{stack.logs()}") from exc


def _ok(stack: GatewayStack, resp: HTTPResponse) -> HTTPResponse:
    assert resp.status == 200, f"{resp.status} {resp.body[:300]!r}\n{stack.logs()}"
    return resp


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("server", SERVERS)
def test_get(stack: GatewayStack, server: str, prefix: str) -> None:
    assert _ok(stack, _get(stack, server, f"{prefix}/")).body == b"hello"
    resp = _ok(stack, _get(stack, server, f"{prefix}/environ?a=1&b=%20"))
    env = json.loads(resp.body)
    assert env["REQUEST_METHOD"] == "GET"
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/environ")  # the last value won
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_PORT"] == str(stack.ports[server])
    assert env["wsgi.url_scheme"] == "http"
    assert "CONTENT_LENGTH" not in env or env["CONTENT_LENGTH"] in ("", "0")


@pytest.mark.parametrize("server", SERVERS)
def test_keepalive_client_many_requests(stack: GatewayStack, server: str) -> None:
    """Twenty requests on one client connection: with ``keep``, nginx sends them over its
    pooled connections to chaussette, one after the other."""
    with Conn(stack.address(server)) as conn:
        for i in range(20):
            conn.send(request_bytes("GET", f"/big?size={1000 + i}", close=False))
            resp = conn.response()
            assert resp.status == 200, stack.logs()
            assert resp.body == b"b" * (1000 + i)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("server", SERVERS)
def test_post_5mb(stack: GatewayStack, server: str, prefix: str) -> None:
    body = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)
    resp = _ok(stack, _get(stack, server, f"{prefix}/echo", method="POST", body=body, timeout=30))
    assert resp.body.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"


@pytest.mark.parametrize("server", SERVERS)
def test_post_environ(stack: GatewayStack, server: str) -> None:
    """nginx's HTTP_CONTENT_TYPE/HTTP_CONTENT_LENGTH copies are dropped (the validator
    would answer 500 otherwise) and the real ones are there."""
    resp = _get(
        stack,
        server,
        "/environ?dump=1",
        method="POST",
        body=b"x=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    env = json.loads(_ok(stack, resp).body)
    assert env["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert env["CONTENT_LENGTH"] == "3"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env


@pytest.mark.parametrize("server", SERVERS)
def test_big_responses(stack: GatewayStack, server: str) -> None:
    size = 3 * 1024 * 1024 + 7
    assert len(_ok(stack, _get(stack, server, f"/big?size={size}")).body) == size
    assert _ok(stack, _get(stack, server, f"/file?size={size}")).body == b"f" * size
    assert _ok(stack, _get(stack, server, "/unbuffered/big?size=100000")).body == b"b" * 100000


@pytest.mark.parametrize("server", SERVERS)
def test_stream_arrives_in_pieces(stack: GatewayStack, server: str) -> None:
    """The first piece reaches the client while the app still holds the second: the app
    sends the second only once the test has created the gate file."""
    gate = stack.directory / f"gate-{server}-{os.urandom(4).hex()}"
    with Conn(stack.address(server), timeout=10) as conn:
        conn.send(request_bytes("GET", f"/unbuffered/gate?path={gate}"))
        try:
            conn.read_until(FIRST)
        except (OSError, AssertionError) as exc:
            raise AssertionError(f"first piece not received: {exc}\n{stack.logs()}") from exc
        assert SECOND not in conn.buf
        gate.touch()
        rest = conn.read_to_eof()
    assert SECOND in rest, rest


@pytest.mark.parametrize("server", SERVERS)
def test_streamed_response_buffered(stack: GatewayStack, server: str) -> None:
    resp = _ok(stack, _get(stack, server, "/stream?n=5&pause=0.01"))
    assert resp.body == b"".join(f"chunk {i}\n".encode() for i in range(5))


@pytest.mark.parametrize("server", SERVERS)
def test_50_concurrent_clients(stack: GatewayStack, server: str) -> None:
    def one(i: int) -> str | None:
        body = (b"%d-" % i) * (2000 + i)
        expected = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        try:
            resp = http_request(stack.address(server), "/echo", "POST", body=body, timeout=30)
        except (OSError, AssertionError) as exc:
            return f"client {i}: {exc!r}"
        if resp.status != 200 or resp.body != expected:
            return f"client {i}: {resp.status} {resp.body[:100]!r}"
        return None

    with ThreadPoolExecutor(50) as pool:
        bad = [x for x in pool.map(one, range(50), timeout=60) if x]
    assert not bad, f"{len(bad)} bad answers: {bad[:3]}\n{stack.logs()}"


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("server", SERVERS)
def test_app_exception_then_next_request(stack: GatewayStack, server: str, prefix: str) -> None:
    assert _get(stack, server, f"{prefix}/error").status == 500
    assert _ok(stack, _get(stack, server, f"{prefix}/")).body == b"hello"
    # Raised after the first chunk: the client gets what nginx makes of it (a cut or a
    # short body, the protocol cannot say more), but the server goes on.
    with contextlib.suppress(OSError, AssertionError):
        http_request(stack.address(server), f"{prefix}/error-mid")
    assert _ok(stack, _get(stack, server, f"{prefix}/")).body == b"hello"
    assert "boom before start_response" in stack.logs()


@pytest.mark.parametrize("server", SERVERS)
def test_stock_params_without_path_info(stack: GatewayStack, server: str) -> None:
    """Debian's fastcgi_params alone: SCRIPT_NAME is the URI and there is no PATH_INFO.
    Whatever rule derives PATH_INFO, the two must still add up to the path."""
    resp = _ok(stack, _get(stack, server, "/stock/some/where?dump=1"))
    env = json.loads(resp.body)
    assert env["SCRIPT_NAME"] + env["PATH_INFO"] == "/stock/some/where"
    assert env["REQUEST_URI"] == "/stock/some/where?dump=1"


@pytest.mark.parametrize("server", SERVERS)
def test_mounted_under_a_prefix(stack: GatewayStack, server: str) -> None:
    """``fastcgi_split_path_info``: SCRIPT_NAME is the mount point, PATH_INFO the rest."""
    env = json.loads(_ok(stack, _get(stack, server, "/app/environ?x=%2F")).body)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app", "/environ")
    assert env["QUERY_STRING"] == "x=%2F"
