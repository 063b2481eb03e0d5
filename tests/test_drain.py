"""Zero dropped requests across a drain, for every backend that can drain (issue 6).

Real chaussette processes on real sockets, under the bounded load of ``tests/load.py``:

- SIGHUP re-exec under load, for every HTTP backend that drains and for FastCGI behind
  nginx: no failed request, and the code edited before the SIGHUP is what every client gets
  afterwards (the app is a file in tmp_path).
- While a drain waits for a request in flight, an idle keep-alive connection (HTTP, or a
  FastCGI keep-conn one) is closed at once: it reads end-of-file while that request is still
  held by the test, released only after. The held request's response says
  ``Connection: close`` and ends its connection, so its client moves to a live process.
- ``--graceful-timeout``, every backend of every listening protocol: a request that
  outlives it is cut, the log says so, exit 1.
- ``--backends`` names the backends that cannot drain, with what to do instead.

(``--workers`` under load is in test_workers.py, sd_notify across a reload in
test_systemd.py.)

Order is proven with events (a marker file written by the app, a gate file it waits for),
never with timings. Every figure of the load is printed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaussette.backends.registry import BACKENDS, BackendInfo, all_backends, capabilities
from chaussette.protocols import fastcgi as fcgi
from chaussette.protocols import scgi
from tests.conftest import (
    Conn,
    Cut,
    HTTPResponse,
    Proc,
    connect,
    free_port,
    poll_until,
    read_until_closed,
    require_peer,
    run_chaussette,
    wait_http,
)
from tests.fcgi_client import FCGIClient, params_for
from tests.load import Load
from tests.nginx import (
    HOST,
    Backend,
    Nginx,
    fastcgi_location,
    logs,
    public_dir,
    server_block,
    upstream_block,
    wait_through,
)

DRAIN_APP = '''\
"""/hold?marker=M&gate=G: writes M (the app runs), waits for G, answers. Else: VERSION."""
import os
import time
from urllib.parse import parse_qs

VERSION = {version!r}


def application(environ, start_response):
    if environ["PATH_INFO"] == "/hold":
        query = {{k: v[-1] for k, v in parse_qs(environ["QUERY_STRING"]).items()}}
        with open(query["marker"], "w"):
            pass
        for _ in range(1500):  # 30 s at most
            if os.path.exists(query["gate"]):
                break
            time.sleep(0.02)
        body = ("held " + VERSION).encode()
    else:
        body = VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''

# versions differ in length: a stale .pyc can never pass for the next one
VERSIONS = ("v1", "v2..", "v3....")
OLD, NEW = VERSIONS[:2]


def write_app(path: Path, version: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(DRAIN_APP.format(version=version))
    os.replace(tmp, path)


def installed(protocol: str) -> list[BackendInfo]:
    return [b for b in BACKENDS if b.protocol == protocol and b.installed()]


def drainable(protocol: str) -> list[BackendInfo]:
    return [b for b in installed(protocol) if b.drain]


HTTP_DRAIN = {b.name: b for b in drainable("http")}


def request(path: str) -> bytes:
    """A keep-alive request (HTTP/1.1, no Connection header)."""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


class Hold:
    """A ``/hold`` request on a keep-alive connection, known to be running in the app."""

    def __init__(self, address: tuple[str, int], tmp: Path, proc: Proc) -> None:
        stamp = time.monotonic_ns()
        self.marker, self.gate = tmp / f"marker-{stamp}", tmp / f"gate-{stamp}"
        self.conn = Conn(address, timeout=20)
        try:
            self.conn.send(request(f"/hold?marker={self.marker}&gate={self.gate}"))
            poll_until(self.marker.exists, "the held request runs", proc)
        except BaseException:
            self.conn.sock.close()
            raise

    def release(self) -> None:
        self.gate.write_text("open")

    def close(self) -> None:
        self.release()
        self.conn.sock.close()


def idle_keepalive(address: tuple[str, int]) -> Conn:
    """A connection that has had one answer and stays open, waiting for the next request."""
    conn = Conn(address, timeout=10)
    try:
        conn.send(request("/"))
        resp = conn.response()
        assert resp.status == 200, resp.raw
        assert "close" not in connection_tokens(resp), resp.raw
    except BaseException:
        conn.sock.close()
        raise
    return conn


def start(procs, tmp_path: Path, backend: str, *args: str) -> tuple[Proc, tuple[str, int]]:
    app = tmp_path / "drain_app.py"
    write_app(app, OLD)
    port = free_port()
    proc = procs.chaussette("--port", str(port), "--backend", backend, *args, str(app))
    address = ("127.0.0.1", port)
    wait_http(address, proc)
    return proc, address


@pytest.fixture
def holds() -> Iterator[list[Hold]]:
    made: list[Hold] = []
    yield made
    for hold in made:
        hold.close()


def connection_tokens(resp: HTTPResponse) -> set[str]:
    values = [v for k, v in resp.headers if k.lower() == "connection"]
    return {token.strip().lower() for value in values for token in value.split(",")}


def reexecs(proc: Proc, count: int) -> None:
    """Until the process has started ``count`` new images (each logs the handed-over fd)."""
    started = re.compile(r"\(fd \d+, re-exec\)")
    poll_until(lambda: len(started.findall(proc.output())) >= count, "re-exec", proc)


@pytest.mark.parametrize("backend", list(HTTP_DRAIN))
def test_sighup_under_load(procs, tmp_path, holds, backend) -> None:
    """Two SIGHUPs under load. At the first one an idle keep-alive connection and a
    request held in the app are there too: the idle connection is closed while the held
    request still runs, the held response says Connection: close and ends its connection.
    No request fails, and the code written before the last SIGHUP answers every client."""
    proc, address = start(procs, tmp_path, backend)
    info = HTTP_DRAIN[backend]
    seen: dict[str, Any] = {}
    app = tmp_path / "drain_app.py"

    def restarts() -> None:
        idle = idle_keepalive(address) if info.keepalive else None
        try:
            hold = Hold(address, tmp_path, proc)
            holds.append(hold)
            write_app(app, VERSIONS[1])
            proc.send(signal.SIGHUP)
            if idle is not None:
                # the held request is not released yet: only the drain can close this one
                seen["idle closed"] = idle.closed_by_server()
        finally:
            if idle is not None:
                idle.sock.close()
        assert not hold.gate.exists()
        hold.release()
        resp = hold.conn.response()
        seen["held"] = resp.body
        seen["held connection"] = connection_tokens(resp)
        seen["held then closed"] = hold.conn.closed_by_server()
        reexecs(proc, 1)
        load.wait_answers(30)
        write_app(app, VERSIONS[2])
        proc.send(signal.SIGHUP)
        reexecs(proc, 2)

    load = Load(address, clients=4, expect=lambda body: body.decode() in VERSIONS)
    report = load.run_while(restarts, before=50, after=100)
    print(backend, report.summary(), seen)
    out = proc.output()
    assert report.failed == 0, f"{report.summary()}\n{out}"
    assert all(report.bodies[v.encode()] for v in VERSIONS), report.bodies
    assert set(report.last_bodies.values()) == {VERSIONS[2].encode()}, (report.last_bodies, out)
    assert len(report.last_bodies) == 4
    assert seen["held"] == f"held {VERSIONS[0]}".encode()
    if info.keepalive:
        assert seen["idle closed"] is True, seen
    assert seen["held then closed"] is True, seen
    assert out.count("all requests finished") == 2 and "passed: cutting" not in out, out
    assert proc.stop() == 0, proc.output()
    assert "close" in seen["held connection"], f"no Connection: close during a drain: {seen}"


# every backend, those that cannot drain too: the timeout bounds any stop
@pytest.mark.parametrize(
    "backend", [b.name for b in BACKENDS if b.protocol == "http" and b.installed()]
)
def test_graceful_timeout_cuts_and_exits_1(procs, tmp_path, holds, backend) -> None:
    proc, address = start(procs, tmp_path, backend, "--graceful-timeout", "1")
    hold = Hold(address, tmp_path, proc)
    holds.append(hold)
    proc.send(signal.SIGTERM)
    try:
        code = proc.wait(15)  # the gate stays shut: only the timeout ends the drain
    except Exception:
        raise AssertionError(f"still running:\n{proc.output()}") from None
    out = proc.output()
    assert code == 1, out
    assert "graceful timeout (1.0s) passed: cutting 1 request(s)" in out, out
    assert "stopped (exit 1)" in out, out
    with pytest.raises((Cut, OSError)):
        hold.conn.response()
    assert not hold.gate.exists()


# -- FastCGI: nginx in front, and chaussette's own FastCGI client --


@pytest.mark.peer
def test_sighup_under_load_fastcgi_through_nginx() -> None:
    """nginx keeps idle FastCGI connections to the backend (keepalive 8, fastcgi_keep_conn):
    the drain closes them at once, nginx opens new ones to the new image, nothing fails."""
    program = require_peer("nginx", "nginx")
    directory = public_dir()
    app = directory / "drain_app.py"
    write_app(app, OLD)
    backend = Backend("fastcgi", "threads", "tcp", directory, app=str(app))
    port = free_port()
    body = upstream_block("keep", backend.upstream, keepalive=8)
    body += server_block(port, fastcgi_location("/", "keep", keep_conn=True))
    nginx = Nginx(program, directory / "nginx", body, [port])
    try:
        nginx.start()
        wait_through(port, backend, nginx)

        def restart() -> None:
            write_app(app, NEW)
            backend.proc.send(signal.SIGHUP)
            reexecs(backend.proc, 1)

        load = Load((HOST, port), clients=4, expect=lambda b: b in (OLD.encode(), NEW.encode()))
        report = load.run_while(restart, before=50, after=100)
        print("fastcgi through nginx:", report.summary())
        out = logs(backend, nginx)
        assert report.failed == 0, f"{report.summary()}\n{out}"
        assert report.bodies[OLD.encode()] and report.bodies[NEW.encode()], report.bodies
        assert set(report.last_bodies.values()) == {NEW.encode()}, (report.last_bodies, out)
        assert "all requests finished" in out and "passed: cutting" not in out, out
    finally:
        nginx.stop()
        code = backend.stop()
        shutil.rmtree(directory, ignore_errors=True)
    assert code == 0, backend.proc.output()


def fcgi_hold(address: tuple[str, int], tmp: Path, proc: Proc) -> tuple[FCGIClient, Path]:
    stamp = time.monotonic_ns()
    marker, gate = tmp / f"marker-{stamp}", tmp / f"gate-{stamp}"
    client = FCGIClient(address, timeout=20)
    client.begin(1, params_for(f"/hold?marker={marker}&gate={gate}"))
    poll_until(marker.exists, "the held FastCGI request runs", proc)
    return client, gate


@pytest.mark.parametrize("engine", [b.name for b in drainable("fastcgi")])
def test_fastcgi_idle_connection_closed_at_once(procs, tmp_path, engine) -> None:
    app = tmp_path / "drain_app.py"
    write_app(app, OLD)
    port = free_port()
    proc = procs.chaussette(
        "--protocol", "fastcgi", "--backend", engine, "--port", str(port), str(app)
    )
    address = ("127.0.0.1", port)
    idle = poll_until(lambda: FCGIClient(address), "FastCGI connect", proc)
    with idle:
        first = idle.request("/", keep_conn=True)
        assert first.cgi()[2] == OLD.encode(), first
        held, gate = fcgi_hold(address, tmp_path, proc)
        with held:
            proc.send(signal.SIGTERM)
            # the held request is not released yet: only the drain can close this one
            assert idle.closed_by_server()
            assert not gate.exists()
            gate.write_text("open")
            result = held.result(1)
            assert result.cgi()[2] == f"held {OLD}".encode(), result
            assert held.closed_by_server()  # keep_conn or not, a drain ends it
    assert proc.wait(15) == 0, proc.output()
    assert "all requests finished" in proc.output()


# -- backends that cannot drain --


def test_backends_names_those_that_cannot_drain() -> None:
    """``--backends``: a backend without drain says so, and what to do instead."""
    code, out = run_chaussette("--backends")
    assert code == 0, out
    rows = {tuple(line.split()[:2]): line for line in out.splitlines() if line.strip()}
    cannot = [b for b in all_backends() if not b.drain]
    assert [b.name for b in cannot if b.protocol == "http"] == ["bjoern"]
    for b in cannot:
        line = rows[(b.protocol, b.name)]
        assert "drain" not in capabilities(b).split(","), line
        assert "CANNOT DRAIN" in line, line
        assert "restart" in line and "backend that drains" in line, line
    for b in all_backends():
        if b.drain:
            assert "drain" in capabilities(b).split(",")
            assert "CANNOT DRAIN" not in rows[(b.protocol, b.name)]
    assert "without it a restart drops requests" in out


OWN = [
    (b.protocol, b.name) for b in BACKENDS if b.protocol in ("fastcgi", "scgi") and b.installed()
]


@pytest.mark.parametrize(("protocol", "engine"), OWN, ids=[f"{p}-{e}" for p, e in OWN])
def test_graceful_timeout_cuts_own_protocols(procs, tmp_path, protocol, engine) -> None:
    app = tmp_path / "drain_app.py"
    write_app(app, OLD)
    port = free_port()
    args = ["--protocol", protocol, "--backend", engine, "--port", str(port)]
    proc = procs.chaussette(*args, "--graceful-timeout", "1", str(app))
    address = ("127.0.0.1", port)
    sock = poll_until(lambda: connect(address), f"{protocol} connect", proc)
    with sock:
        marker, gate = tmp_path / "marker", tmp_path / "gate"
        params = params_for(f"/hold?marker={marker}&gate={gate}")
        pairs = [(k.encode(), v.encode()) for k, v in params.items()]
        if protocol == "fastcgi":
            data = fcgi.encode_begin_request(1, keep_conn=True)
            data += fcgi.encode_stream(fcgi.PARAMS, 1, fcgi.encode_pairs(pairs))
            data += fcgi.encode_stream(fcgi.PARAMS, 1, b"")
            data += fcgi.encode_stream(fcgi.STDIN, 1, b"")
        else:
            data = scgi.encode_request(pairs, b"")
        sock.sendall(data)
        poll_until(marker.exists, "the held request runs", proc)
        proc.send(signal.SIGTERM)
        assert proc.wait(15) == 1, proc.output()
        received = read_until_closed(sock)
    out = proc.output()
    assert "graceful timeout (1.0s) passed: cutting 1 request(s)" in out, out
    assert "stopped (exit 1)" in out, out
    assert b"held" not in received, received  # cut: the app never answered
    assert not gate.exists()
