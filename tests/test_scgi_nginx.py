"""Real nginx ``scgi_pass`` in front of chaussette's SCGI server, on every engine.

SCGI is one request per connection: nginx opens a connection, sends the netstring header
block (CONTENT_LENGTH first, SCGI=1) and the body, and reads the response until the
server closes. ``/`` is buffered (nginx's default), ``/unbuffered/...`` has
``scgi_buffering off``, ``/stock/`` sends Debian's scgi_params alone (no SCRIPT_NAME, no
PATH_INFO). The app is tests/apps/gateway_app.py (inside ``wsgiref.validate``).
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
from tests.nginx import GatewayStack, scgi_location

ENGINES = ("threads", "gevent", "eventlet")
TRANSPORTS = ("tcp", "unix")
PREFIXES = ("", "/unbuffered")

LOCATIONS = (
    scgi_location("/", "close")
    + scgi_location("/unbuffered/", "close", buffering=False, strip="/unbuffered")
    + scgi_location("/stock/", "close", stock_params=True)
)


@pytest.fixture(
    scope="module",
    params=[(e, t) for e in ENGINES for t in TRANSPORTS],
    ids=[f"{e}-{t}" for e in ENGINES for t in TRANSPORTS],
)
def stack(request: pytest.FixtureRequest) -> Iterator[GatewayStack]:
    nginx = require_peer("nginx", "nginx")
    engine, transport = request.param
    gateway = GatewayStack(nginx, "scgi", engine, transport, {"main": LOCATIONS})
    try:
        yield gateway
    finally:
        code = gateway.close()
    assert code == 0, f"chaussette exited {code} after SIGTERM:\n{gateway.logs()}"


def _get(stack: GatewayStack, path: str, **kw: object) -> HTTPResponse:
    try:
        resp = http_request(stack.address("main"), path, **kw)  # type: ignore[arg-type]
    except (OSError, AssertionError) as exc:
        raise AssertionError(f"{path}: {exc}\n{stack.logs()}") from exc
    return resp


def _ok(stack: GatewayStack, resp: HTTPResponse) -> HTTPResponse:
    assert resp.status == 200, f"{resp.status} {resp.body[:300]!r}\n{stack.logs()}"
    return resp


@pytest.mark.parametrize("prefix", PREFIXES)
def test_get(stack: GatewayStack, prefix: str) -> None:
    assert _ok(stack, _get(stack, f"{prefix}/")).body == b"hello"
    env = json.loads(_ok(stack, _get(stack, f"{prefix}/environ?q=%2F")).body)
    assert env["REQUEST_METHOD"] == "GET"
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/environ")
    assert env["QUERY_STRING"] == "q=%2F"
    assert env["SERVER_PORT"] == str(stack.ports["main"])
    assert "SCGI" not in env or env["SCGI"] == "1"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_post(stack: GatewayStack, prefix: str) -> None:
    body = hashlib.sha256(b"scgi").digest() * (2 * 1024 * 1024 // 32 + 3)
    resp = _ok(stack, _get(stack, f"{prefix}/echo", method="POST", body=body, timeout=30))
    assert resp.body.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    lines = b"".join(b"line %d\n" % i for i in range(1000))
    assert _ok(stack, _get(stack, f"{prefix}/lines", method="POST", body=lines)).body == b"1000"


def test_post_environ(stack: GatewayStack) -> None:
    resp = _get(
        stack,
        "/environ?dump=1",
        method="POST",
        body=b"a=b&c=d",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    env = json.loads(_ok(stack, resp).body)
    assert (env["CONTENT_TYPE"], env["CONTENT_LENGTH"]) == (
        "application/x-www-form-urlencoded",
        "7",
    )
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env


def test_stream_arrives_in_pieces(stack: GatewayStack) -> None:
    """The first piece reaches the client while the app still holds the second."""
    gate = stack.directory / f"gate-{os.urandom(4).hex()}"
    with Conn(stack.address("main"), timeout=10) as conn:
        conn.send(request_bytes("GET", f"/unbuffered/gate?path={gate}"))
        try:
            conn.read_until(FIRST)
        except (OSError, AssertionError) as exc:
            raise AssertionError(f"first piece not received: {exc}\n{stack.logs()}") from exc
        assert SECOND not in conn.buf
        gate.touch()
        rest = conn.read_to_eof()
    assert SECOND in rest, rest


@pytest.mark.parametrize("prefix", PREFIXES)
def test_big_and_streamed(stack: GatewayStack, prefix: str) -> None:
    size = 2 * 1024 * 1024 + 1
    assert _ok(stack, _get(stack, f"{prefix}/big?size={size}")).body == b"b" * size
    resp = _ok(stack, _get(stack, f"{prefix}/stream?n=4&pause=0.01"))
    assert resp.body == b"".join(f"chunk {i}\n".encode() for i in range(4))


def test_20_concurrent_clients(stack: GatewayStack) -> None:
    def one(i: int) -> str | None:
        body = b"%d;" % i * (1000 + i)
        expected = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        try:
            resp = http_request(stack.address("main"), "/echo", "POST", body=body, timeout=30)
        except (OSError, AssertionError) as exc:
            return f"client {i}: {exc!r}"
        return None if resp.body == expected else f"client {i}: {resp.status} {resp.body!r}"

    with ThreadPoolExecutor(20) as pool:
        bad = [x for x in pool.map(one, range(20), timeout=60) if x]
    assert not bad, f"{bad[:3]}\n{stack.logs()}"


def test_app_exception_then_next_request(stack: GatewayStack) -> None:
    assert _get(stack, "/error").status == 500
    assert _ok(stack, _get(stack, "/")).body == b"hello"
    with contextlib.suppress(OSError, AssertionError):
        http_request(stack.address("main"), "/error-mid")
    assert _ok(stack, _get(stack, "/")).body == b"hello"


def test_stock_params_without_path_info(stack: GatewayStack) -> None:
    """Debian's scgi_params alone send neither SCRIPT_NAME nor PATH_INFO, only
    REQUEST_URI/DOCUMENT_URI: the two must still add up to the path."""
    env = json.loads(_ok(stack, _get(stack, "/stock/a/b?dump=1")).body)
    assert env["SCRIPT_NAME"] + env["PATH_INFO"] == "/stock/a/b"
