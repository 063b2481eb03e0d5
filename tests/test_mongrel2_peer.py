"""chaussette's Mongrel2 handler behind the real Mongrel2 server (Debian mongrel2-core).

One Mongrel2 per module (tests/mongrel2.py); each test starts its own handler processes.
The app is tests/apps/m2_app.py: routes.py and gateway_app.py inside wsgiref.validate.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

import pytest

from tests.conftest import Conn, http_request, request_bytes, require_module
from tests.mongrel2 import Mongrel2, start_mongrel2, wait_handler

require_module("zmq", "pip install 'chaussette[mongrel2]'")

APP = "tests.apps.m2_app:application"
ENGINES = ["threads", "gevent", "eventlet"]
BIG = 5 * 1000 * 1000


@pytest.fixture(scope="module")
def m2(tmp_path_factory):
    server = start_mongrel2(tmp_path_factory.mktemp("m2"))
    yield server
    server.stop()


def handler(procs, m2: Mongrel2, backend: str = "threads", *extra: str, wait: bool = True):
    """A chaussette handler run from Mongrel2's directory (upload paths are relative to it)."""
    args = ["--protocol", "mongrel2", "--backend", backend]
    if not any(a in extra for a in ("--zeromq", "--m2-config")):
        args += ["--zeromq", m2.tnet, "--upload-dir", "tmp"]
    proc = procs.chaussette(*args, *extra, APP, cwd=m2.workdir)
    if wait:
        wait_handler(m2, proc)
    return proc


def assert_clean(proc) -> None:
    out = proc.output()
    for bad in ("Traceback", "AssertionError", "WSGIWarning"):
        assert bad not in out, out


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("backend", ENGINES)
def test_requests(procs, m2, backend):
    proc = handler(procs, m2, backend)
    assert http_request(m2.address, "/app/").body == b"hello"
    body = os.urandom(1000)
    resp = http_request(m2.address, "/app/echo", "POST", body)
    assert resp.body == f"1000 {hashlib.sha256(body).hexdigest()}".encode()
    # environ from Mongrel2's headers: the /app route is the mount point
    raw = request_bytes("GET", "/app/environ?x=1&y=%20", "X-A: 1", "X-A: 2", "Cookie: a=1")
    raw = raw.replace(b"\r\n\r\n", b"\r\nCookie: b=2\r\n\r\n")
    with Conn(m2.address) as conn:
        conn.send(raw)
        env = json.loads(conn.response().body)
    assert env["SCRIPT_NAME"] == "/app" and env["PATH_INFO"] == "/environ"
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["HTTP_X_A"] == "1, 2" and env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["wsgi.url_scheme"] == "http" and env["SERVER_PORT"] == "80"
    # keep-alive: three requests on one connection; the last asks to close, and we close
    with Conn(m2.address) as conn:
        for _ in range(2):
            conn.send(request_bytes("GET", "/app/", close=False))
            assert conn.response().body == b"hello"
        conn.send(request_bytes("GET", "/app/stream?n=2&pause=0", close=False))
        streamed = conn.response()
        assert streamed.header("Transfer-Encoding") == "chunked"
        assert streamed.body == b"chunk 0\nchunk 1\n"
        conn.send(request_bytes("GET", "/app/"))
        assert conn.response().body == b"hello"
        assert conn.closed_by_server()
    # HTTP/1.0: no chunked encoding; the handler closes the connection to end the body
    with Conn(m2.address) as conn:
        conn.send(b"GET /app/stream?n=2&pause=0 HTTP/1.0\r\nHost: localhost\r\n\r\n")
        raw = conn.read_to_eof()
    assert raw.startswith(b"HTTP/1.0 200 OK\r\n") and b"chunked" not in raw
    assert raw.endswith(b"\r\n\r\nchunk 0\nchunk 1\n")
    # HTTP/1.0 keep-alive with a Content-Length
    with Conn(m2.address) as conn:
        conn.send(b"GET /app/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = conn.response()
        assert resp.body == b"hello" and resp.header("Connection") == "keep-alive"
        conn.send(b"GET /app/ HTTP/1.0\r\n\r\n")
        assert conn.response().body == b"hello"
        assert conn.closed_by_server()
    # HEAD: the GET's headers, no body
    with Conn(m2.address) as conn:
        conn.send(request_bytes("HEAD", "/app/"))
        head = conn.read_to_eof()
    assert head.endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\n")
    # Expect: 100-continue: answered once (Mongrel2 does it), then the response
    with Conn(m2.address) as conn:
        conn.send(request_bytes("POST", "/app/echo", "Expect: 100-continue", "Content-Length: 3"))
        assert conn.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.send(b"abc")
        assert conn.response().body == f"3 {hashlib.sha256(b'abc').hexdigest()}".encode()
    # the app's error: a 500 before the response starts, a cut connection after
    assert http_request(m2.address, "/app/error").status == 500
    with Conn(m2.address) as conn:
        conn.send(request_bytes("GET", "/app/error-mid"))
        cut = conn.read_to_eof()
    assert b"first part" in cut and not cut.endswith(b"0\r\n\r\n")
    proc.stop()
    out = proc.output()
    assert "connected to Mongrel2" in out
    assert "boom before start_response" in out and "boom mid-stream" in out
    assert "AssertionError" not in out and "WSGIWarning" not in out


@pytest.mark.parametrize("backend", ENGINES)
def test_streamed_response_arrives_in_pieces(procs, m2, backend, short_tmp):
    proc = handler(procs, m2, backend)
    gate = short_tmp / "gate"
    with Conn(m2.address) as conn:
        conn.send(request_bytes("GET", f"/app/gate?path={gate}"))
        head = conn.read_until(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        assert conn.read_until(b"first piece\n\r\n").endswith(b"first piece\n\r\n")
        gate.write_text("open")  # only now may the second piece be produced
        rest = conn.read_to_eof()
    assert b"second piece\n" in rest and rest.endswith(b"0\r\n\r\n")
    assert_clean(proc)


@pytest.mark.parametrize("backend", ENGINES)
def test_a_blocked_request_does_not_hold_the_others(procs, m2, backend, short_tmp):
    proc = handler(procs, m2, backend)
    gates = [short_tmp / f"gate{i}" for i in range(3)]
    conns = [Conn(m2.address) for _ in gates]
    try:
        for conn, gate in zip(conns, gates, strict=True):  # three apps waiting at once
            conn.send(request_bytes("GET", f"/app/gate?path={gate}"))
            conn.read_until(b"first piece\n\r\n")
        assert http_request(m2.address, "/app/").body == b"hello"  # and a fourth request
        for conn, gate in zip(conns, gates, strict=True):
            gate.write_text("open")
            assert conn.read_until(b"0\r\n\r\n").endswith(b"second piece\n\r\n0\r\n\r\n")
    finally:
        for conn in conns:
            conn.sock.close()
    assert_clean(proc)


@pytest.mark.parametrize("backend", ENGINES)
def test_async_upload(procs, m2, backend):
    proc = handler(procs, m2, backend)
    body = os.urandom(BIG)
    resp = http_request(m2.address, "/app/echo", "POST", body, timeout=30)
    assert resp.body == f"{BIG} {hashlib.sha256(body).hexdigest()}".encode()
    assert wait_until(lambda: not list(m2.uploads.iterdir())), list(m2.uploads.iterdir())
    # the app reads the body while Mongrel2 is still writing it: it answers after the
    # first 64 KiB while the client holds back most of its body
    with Conn(m2.address, timeout=20) as conn:
        conn.send(request_bytes("POST", "/app/first?n=65536", f"Content-Length: {BIG}"))
        conn.send(body[: BIG // 5])
        resp = conn.response()
        first = body[:65536]
        assert resp.body == f"65536 {hashlib.sha256(first).hexdigest()}".encode()
    assert wait_until(lambda: not list(m2.uploads.iterdir())), list(m2.uploads.iterdir())
    assert "refused" not in proc.output()
    assert_clean(proc)


@pytest.mark.parametrize("backend", ENGINES)
def test_client_disconnect_mid_stream_closes_the_iterable(procs, m2, backend, short_tmp):
    proc = handler(procs, m2, backend)
    marker = short_tmp / "closed"
    with Conn(m2.address) as conn:
        conn.send(request_bytes("GET", f"/app/closed?marker={marker}&n=2000&pause=0.01"))
        conn.read_exact(100_000)
    assert wait_until(marker.exists), proc.output()
    assert http_request(m2.address, "/app/").body == b"hello"
    assert_clean(proc)


def test_json_handler(procs, m2):
    proc = handler(procs, m2, "threads", "--zeromq", m2.json, wait=False)
    wait_handler(m2, proc, "/json/")
    env = json.loads(http_request(m2.address, "/json/x/y?q=%41&dump=1").body)
    assert env["SCRIPT_NAME"] == "/json" and env["PATH_INFO"] == "/x/y"
    assert env["QUERY_STRING"] == "q=%41&dump=1"
    body = b"json handler body"
    resp = http_request(m2.address, "/json/echo", "POST", body)
    assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
    assert_clean(proc)


def test_two_handler_processes_share_the_load(procs, m2):
    first = handler(procs, m2, "threads", wait=False)
    second = handler(procs, m2, "gevent", wait=False)
    for proc in (first, second):
        proc.wait_for_output("connected to Mongrel2", timeout=20)
    # Mongrel2 pushes each message to the next handler; on one keep-alive connection no
    # disconnect message comes between two requests (with a connection per request, the
    # disconnects would take every other turn and the requests could all land on one)
    seen = set()
    with Conn(m2.address) as conn:
        for _ in range(10):
            conn.send(request_bytes("GET", "/app/pid", close=False))
            seen.add(int(conn.response().body))
    assert seen == {first.pid, second.pid}


def test_m2_config_lookup(procs, m2):
    config = str(m2.config)
    # by route, run from elsewhere: the upload directory comes from the database
    proc = procs.chaussette(
        "--protocol", "mongrel2", "--m2-config", config, "--m2-handler", "/json", APP
    )
    wait_handler(m2, proc, "/json/")
    body = os.urandom(100_000)
    resp = http_request(m2.address, "/json/echo", "POST", body, timeout=30)
    assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
    assert f"async uploads read from {os.path.realpath(m2.uploads)}" in proc.output()
    proc.stop()
    # by send_ident, and by host + route
    for selector, path in (
        ("34f9ceee-cd52-4b7f-b197-88bf2f0ec378", "/app/"),
        ("localhost/app", "/app/"),
    ):
        proc = procs.chaussette(
            "--protocol", "mongrel2", "--m2-config", config, "--m2-handler", selector, APP
        )
        wait_handler(m2, proc, path)
        proc.stop()
    # ambiguous: two handlers and no --m2-handler
    proc = procs.chaussette("--protocol", "mongrel2", "--m2-config", config, APP)
    assert proc.wait(30) == 2
    assert "has 2 handlers: pick one with --m2-handler" in proc.output()


def test_forged_upload_headers_are_refused(procs, m2, short_tmp):
    proc = handler(procs, m2)
    secret = m2.workdir / "secret.txt"
    secret.write_text("do not read or delete me")
    outside = short_tmp / "victim"
    outside.write_text("nor me")
    link = m2.uploads / "evil"
    link.symlink_to(secret)
    forged = [
        # both headers, as a client can send them with a small body: names outside tmp/
        ("secret.txt", "secret.txt", b""),
        (str(outside), str(outside), b""),
        ("tmp/../secret.txt", "tmp/../secret.txt", b""),
        ("tmp/evil", "tmp/evil", b""),  # a symbolic link in the upload dir, pointing out
        # the start header alone, with no body: Mongrel2 passes it on as is
        ("tmp/evil", None, b""),
        (str(outside), None, b""),
        # with a body: never a real upload message
        ("tmp/evil", None, b"inline"),
    ]
    try:
        for start, done, body in forged:
            headers = {"X-Mongrel2-Upload-Start": start}
            if done:
                headers["X-Mongrel2-Upload-Done"] = done
            resp = http_request(m2.address, "/app/echo", "POST", body, headers=headers)
            assert resp.status == 400, (start, done, resp.raw[:200])
        # a body big enough to be spooled: Mongrel2 replaces the start header with its own
        # file, but a client's done header gets through: the two disagree, 400
        body = os.urandom(100_000)
        headers = {"X-Mongrel2-Upload-Done": str(outside)}
        assert http_request(m2.address, "/app/echo", "POST", body, headers=headers).status == 400
        # a forged start header alone is replaced: the real upload is read, not the victim
        headers = {"X-Mongrel2-Upload-Start": str(outside)}
        resp = http_request(m2.address, "/app/echo", "POST", body, headers=headers)
        assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        assert secret.read_text() == "do not read or delete me"
        assert outside.read_text() == "nor me"
        assert link.is_symlink()
        assert http_request(m2.address, "/app/").body == b"hello"
        refused = proc.output().count("answered 400")
        assert refused >= len(forged) + 1, proc.output()
        assert "Traceback" not in proc.output()
    finally:
        link.unlink()
        assert wait_until(lambda: not list(m2.uploads.iterdir())), list(m2.uploads.iterdir())


def test_sigterm_finishes_in_flight_requests(procs, m2):
    proc = handler(procs, m2)
    result: dict[str, object] = {}

    def slow() -> None:
        result["resp"] = http_request(m2.address, "/app/slow?s=1", timeout=20)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    proc.send(signal.SIGTERM)
    thread.join(20)
    assert proc.wait(20) == 0, proc.output()
    assert result["resp"].body == b"slow done"  # type: ignore[attr-defined]
    assert "all requests finished" in proc.output()


def test_sighup_restarts_in_place(procs, m2):
    proc = handler(procs, m2, "gevent")
    proc.send(signal.SIGHUP)
    proc.wait_for_output("re-executing", timeout=20)
    deadline = time.monotonic() + 20
    while proc.output().count("connected to Mongrel2") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    wait_handler(m2, proc)
    assert int(http_request(m2.address, "/app/pid").body) == proc.pid
    assert_clean(proc)


def test_uploads_refused_without_an_upload_dir(procs, m2):
    proc = handler(procs, m2, "threads", "--zeromq", m2.tnet)
    body = os.urandom(50_000)
    assert http_request(m2.address, "/app/echo", "POST", body).status == 400
    assert "no upload directory (set --upload-dir)" in proc.output()
    # without an upload directory nothing is trusted: Mongrel2's spool file stays
    left = list(m2.uploads.iterdir())
    assert len(left) == 1, left
    left[0].unlink()
    assert proc.output().count("answered 400") == 1, proc.output()


M2_LIMIT = 20480  # limits.content_length: the fixture's Mongrel2 keeps the default


@pytest.mark.parametrize(
    ("backend", "where"),
    [("threads", "--m2-config"), ("gevent", "--zeromq")],
)
def test_upload_headers_on_an_unspooled_request_touch_no_file(procs, m2, backend, where):
    """Mongrel2 spools (and names a file in upload headers) only for a Content-Length over
    its limit: upload headers on any other request are a client's, naming perhaps another
    client's spool file. 400, and that file is neither read nor deleted."""
    if where == "--m2-config":
        args = ("--m2-config", str(m2.config), "--m2-handler", "/app")
    else:
        args = ("--zeromq", m2.tnet, "--upload-dir", "tmp")
    proc = handler(procs, m2, backend, *args)
    victim = m2.uploads / "upload.victim"
    victim.write_bytes(b"another client's upload")
    name = "tmp/upload.victim"
    start = f"X-Mongrel2-Upload-Start: {name}"
    done = f"X-Mongrel2-Upload-Done: {name}"
    forged = [
        # a start naming the file (defect: it was opened, then deleted after the response)
        request_bytes("POST", "/app/echo", start, "Content-Length: 0"),
        request_bytes("GET", "/app/echo", start),  # no Content-Length at all
        request_bytes("POST", "/app/echo", start, body=b"inline"),
        # the largest body Mongrel2 passes inline: never spooled
        request_bytes("POST", "/app/echo", start, body=b"x" * M2_LIMIT),
        # start and done on a plain request (defect: never answered)
        request_bytes("GET", "/app/", start, done),
        request_bytes("POST", "/app/echo", start, done, "Content-Length: 0"),
    ]
    try:
        for raw in forged:
            with Conn(m2.address) as conn:
                conn.send(raw)
                resp = conn.response()
                assert resp.status == 400, (raw[:120], resp.raw[:200])
                assert conn.closed_by_server()
            assert victim.read_bytes() == b"another client's upload", raw[:120]
        # pipelined behind a forged done: the 400 closes the connection, so the second
        # request gets no response that could be taken for the first one's
        with Conn(m2.address) as conn:
            conn.send(
                request_bytes("GET", "/app/", start, done, close=False)
                + request_bytes("GET", "/app/pid")
            )
            assert conn.response().status == 400
            assert conn.closed_by_server()
        assert victim.read_bytes() == b"another client's upload"
        # still serving: plain requests, and a real upload (its own file removed after)
        assert http_request(m2.address, "/app/").body == b"hello"
        body = os.urandom(M2_LIMIT + 1)
        resp = http_request(m2.address, "/app/echo", "POST", body)
        assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        assert wait_until(lambda: list(m2.uploads.iterdir()) == [victim])
        assert victim.read_bytes() == b"another client's upload"
        out = proc.output()
        assert out.count("answered 400") == len(forged) + 1, out
        assert "bodies over 20480 bytes (limits.content_length), so not its" in out, out
        assert "without a valid Content-Length ('')" in out, out
        assert_clean(proc)
    finally:
        victim.unlink()
