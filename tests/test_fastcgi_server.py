"""chaussette's own FastCGI server on its three engines, spoken to by a real client.

Every test starts real ``chaussette --protocol fastcgi --backend ENGINE`` processes and talks
to them over real sockets with tests/fcgi_client.py (built on the core's codec), which can
interleave requests on one connection. The app is tests/apps/gateway_app.py: routes.py
inside ``wsgiref.validate.validator``, so any breach of PEP 3333 by the server is a 500.
The nginx and cgi-fcgi tests are elsewhere (test_fastcgi_nginx.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaussette.errors import UsageError
from chaussette.protocols import fastcgi as fcgi
from chaussette.settings import check, parse_args, parse_request_model
from tests.apps.gateway_app import FIRST, SECOND
from tests.conftest import Proc, chaussette_cmd, free_port, poll_until
from tests.fcgi_client import FCGIClient, Result, fcgi_get, params_for

ENGINES = ["threads", "gevent", "eventlet"]
APP = "tests.apps.gateway_app:application"
LOCAL = "127.0.0.1"


def wait_fcgi(address: tuple[str, int] | str, proc: Proc, timeout: float = 20) -> None:
    """Poll until a request succeeds (a connect alone proves nothing)."""
    poll_until(
        lambda: fcgi_get(address, "/").ended, f"FastCGI answer from {address}", proc, timeout
    )


def start(procs, engine: str, *args: str, app: str = APP) -> tuple[Proc, tuple[str, int]]:
    port = free_port()
    proc = procs.chaussette(
        "--protocol", "fastcgi", "--backend", engine, "--port", str(port), *args, app
    )
    address = (LOCAL, port)
    wait_fcgi(address, proc)
    return proc, address


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tmp_path_factory) -> Iterator[tuple[Proc, tuple[str, int]]]:
    """One server per engine, shared by the tests that need no special option."""
    port = free_port()
    proc = Proc(
        chaussette_cmd(
            "--protocol", "fastcgi", "--backend", request.param, "--port", str(port), APP
        ),
        log_dir=tmp_path_factory.mktemp("fcgi"),
    )
    try:
        wait_fcgi((LOCAL, port), proc)
        yield proc, (LOCAL, port)
    finally:
        proc.stop()
    assert "WSGIWarning" not in proc.output()


def ok(result: Result) -> bytes:
    status, _, body = result.cgi()
    assert (status, result.app_status, result.protocol_status) == (200, 0, 0), result
    return body


def dump(client: FCGIClient, params: dict[str, str], request_id: int = 1) -> dict[str, str]:
    client.begin(request_id, params)
    data: dict[str, str] = json.loads(ok(client.result(request_id)))
    return data


# -- the basics, on every engine --


def test_get_keepalive_and_environ(server):
    _, address = server
    with FCGIClient(address) as client:
        for request_id in (1, 2, 1):  # ids may be reused once ended
            environ = dump(client, params_for("/some/where?dump=1&x=%41"), request_id)
        assert environ["PATH_INFO"] == "/some/where"
        assert environ["QUERY_STRING"] == "dump=1&x=%41"
        assert environ["REQUEST_METHOD"] == "GET"
        assert environ["wsgi.url_scheme"] == "http"
        assert "CONTENT_LENGTH" not in environ


def test_small_response_arrives_in_one_read(server):
    _, address = server
    with FCGIClient(address) as client:
        client.send(client.begin_bytes(1, params_for("/")))
        data = client.sock.recv(65536)  # head, body and END_REQUEST were one write
        records = client.reader.feed(data)
        assert [r.type for r in records] == [fcgi.STDOUT, fcgi.STDOUT, fcgi.END_REQUEST]
        assert records[0].content.endswith(b"\r\n\r\nhello")


def test_post_5mb_streamed_in_and_read_in_chunks(server):
    _, address = server
    body = os.urandom(5 * 1024 * 1024)
    with FCGIClient(address) as client:
        client.begin(1, params_for("/echo?chunk=10000", "POST", body), body=None)
        for start_at in range(0, len(body), 300_000):  # in pieces, as a proxy would
            client.send_body(1, body[start_at : start_at + 300_000], end=False)
        client.send_body(1, b"", end=True)
        answer = ok(client.result(1))
    assert answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def test_app_starts_before_the_body_is_complete(server):
    _, address = server
    with FCGIClient(address) as client:
        client.begin(1, params_for("/lines", "POST", b"x" * 12), body=None)
        client.send_body(1, b"one\ntwo\n", end=False)
        time.sleep(0.2)  # the app is reading by now; the rest of the body comes later
        client.send_body(1, b"thr\n", end=True)
        assert ok(client.result(1)) == b"3"


def test_stream_arrives_in_pieces(server, tmp_path):
    _, address = server
    gate = tmp_path / "gate"
    with FCGIClient(address) as client:
        client.begin(1, params_for(f"/gate?path={gate}"))
        for _ in range(1000):  # the first piece comes while the app still holds the rest
            if FIRST in client.results[1].stdout:
                break
            assert client.read_some()
        assert SECOND not in client.results[1].stdout
        gate.touch()
        assert ok(client.result(1)).endswith(FIRST + SECOND)


def test_app_exception_is_500_then_next_request_works(server):
    proc, address = server
    with FCGIClient(address) as client:
        result = client.request("/error")
        assert result.cgi()[0] == 500
        assert result.app_status == 1
        assert ok(client.request("/", request_id=2)) == b"hello"
    assert "boom before start_response" in proc.output()


def test_two_interleaved_requests_the_faster_finishes_first(server):
    _, address = server
    with FCGIClient(address) as client:
        client.begin(1, params_for("/slow?s=0.6"))
        client.begin(2, params_for("/"))
        assert client.first_ended(1, 2) == 2
        assert ok(client.results[2]) == b"hello"
        assert not client.results[1].ended
        assert ok(client.result(1)) == b"slow done"


def test_get_values_and_unknown_management_record(server):
    _, address = server
    with FCGIClient(address) as client:
        values = client.get_values(fcgi.FCGI_MAX_CONNS, fcgi.FCGI_MAX_REQS, fcgi.FCGI_MPXS_CONNS)
        assert values == {
            fcgi.FCGI_MAX_CONNS: b"1024",
            fcgi.FCGI_MAX_REQS: b"1024",
            fcgi.FCGI_MPXS_CONNS: b"1",
        }
        client.send(fcgi.encode_record(42, 0, b"?"))
        assert client.management_record().type == fcgi.UNKNOWN_TYPE
        assert ok(client.request("/")) == b"hello"


def test_unknown_role_is_refused(server):
    _, address = server
    with FCGIClient(address) as client:
        client.results[3] = Result()
        client.send(fcgi.encode_begin_request(3, role=fcgi.AUTHORIZER))
        assert client.result(3).protocol_status == fcgi.UNKNOWN_ROLE
        assert ok(client.request("/")) == b"hello"


def test_abort_request_closes_the_app_iterable(server, tmp_path):
    _, address = server
    marker = tmp_path / "closed"
    with FCGIClient(address) as client:
        client.begin(1, params_for(f"/closed?marker={marker}&n=2000&pause=0.01"))
        client.begin(2, params_for("/slow?s=0.3"))
        while not client.results[1].stdout:
            assert client.read_some()
        client.abort(1)
        result = client.result(1)
        assert (result.app_status, result.protocol_status) == (2, 0)
        assert marker.read_text() == "closed"  # close() ran before END_REQUEST
        assert ok(client.result(2)) == b"slow done"  # the other request went on
        assert ok(client.request("/", request_id=1)) == b"hello"


def test_peer_closing_abandons_its_requests(server, tmp_path):
    proc, address = server
    seen = len(proc.output())
    marker = tmp_path / "closed"
    with FCGIClient(address) as client:
        client.begin(1, params_for(f"/closed?marker={marker}&n=2000&pause=0.01"))
        while not client.results[1].stdout:
            assert client.read_some()
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.read_text() == "closed"
    assert ok(fcgi_get(address, "/")) == b"hello"
    assert "Traceback" not in proc.output()[seen:]


def test_keep_conn_0_closes_after_the_response(server):
    _, address = server
    with FCGIClient(address) as client:
        assert ok(client.request("/", keep_conn=False)) == b"hello"
        assert client.closed_by_server()


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2000, "version"),  # not FastCGI at all
        (fcgi.encode_stream(fcgi.STDIN, 9, b"body"), "never begun"),
        (
            fcgi.encode_begin_request(1)
            + fcgi.encode_stream(fcgi.PARAMS, 1, fcgi.encode_pairs([(b"X", b"y" * 70000)])),
            "--max-params-size",
        ),
    ],
    ids=["http", "unknown-id", "oversize-params"],
)
def test_bad_peer_is_closed_with_one_line_and_the_server_goes_on(server, garbage, reason):
    proc, address = server
    seen = len(proc.output())
    before = proc.output().count("WARNING")
    with FCGIClient(address) as client:
        try:
            client.send(garbage)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: that is the point
        assert client.closed_by_server()
        port = client.sock.getsockname()[1]
    assert ok(fcgi_get(address, "/")) == b"hello"
    lines = [line for line in proc.output().splitlines() if "WARNING" in line]
    deadline = time.monotonic() + 5
    while len(lines) == before and time.monotonic() < deadline:
        time.sleep(0.02)
        lines = [line for line in proc.output().splitlines() if "WARNING" in line]
    new = lines[before:]
    assert len(new) == 1, new
    assert f"127.0.0.1:{port}" in new[0] and reason in new[0], new[0]
    assert "Traceback" not in proc.output()[seen:]


def test_sigterm_finishes_the_request_in_flight_and_closes_idle_ones(procs, tmp_path):
    for engine in ENGINES:
        proc, address = start(procs, engine)
        gate = tmp_path / f"gate-{engine}"
        with FCGIClient(address) as busy, FCGIClient(address) as idle:
            assert ok(idle.request("/")) == b"hello"  # then stays idle, kept alive
            busy.begin(1, params_for(f"/gate?path={gate}"))
            while FIRST not in busy.results[1].stdout:
                assert busy.read_some()
            proc.send(signal.SIGTERM)
            assert idle.closed_by_server()  # at once: it had no request in flight
            gate.touch()
            assert ok(busy.result(1)).endswith(SECOND)
            assert busy.closed_by_server()
        assert proc.wait(15) == 0, proc.output()
        assert "all requests finished" in proc.output()


@pytest.mark.parametrize("engine", ENGINES)
def test_overloaded_beyond_max_reqs(procs, engine):
    _, address = start(procs, engine, "--max-reqs", "1")
    with FCGIClient(address) as slow, FCGIClient(address) as other:
        slow.begin(1, params_for("/slow?s=0.5"))
        time.sleep(0.2)  # the slow request is in flight
        other.results[1] = Result()
        other.begin(1, params_for("/"))
        assert other.result(1).protocol_status == fcgi.OVERLOADED
        assert ok(slow.result(1)) == b"slow done"
        assert ok(other.request("/", request_id=2)) == b"hello"
    values = fcgi_values((LOCAL, address[1]))
    assert values[fcgi.FCGI_MAX_REQS] == b"1"


def fcgi_values(address: tuple[str, int] | str) -> dict[bytes, bytes]:
    with FCGIClient(address) as client:
        return client.get_values(fcgi.FCGI_MAX_CONNS, fcgi.FCGI_MAX_REQS, fcgi.FCGI_MPXS_CONNS)


@pytest.mark.parametrize("engine", ENGINES)
def test_max_conns_bounds_connections(procs, engine):
    _, address = start(procs, engine, "--max-conns", "1")
    assert fcgi_values(address)[fcgi.FCGI_MAX_CONNS] == b"1"
    with FCGIClient(address) as first:
        assert ok(first.request("/")) == b"hello"
        with FCGIClient(address, timeout=0.5) as second:  # queued in the kernel: no answer
            second.begin(1, params_for("/"))
            with pytest.raises(TimeoutError):
                second.result(1)
    assert ok(fcgi_get(address, "/")) == b"hello"  # the first closed: the next is served


# -- listeners --


@pytest.mark.parametrize("engine", ENGINES)
def test_inherited_fd_and_unix_socket(procs, engine, short_tmp):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOCAL, 0))
        listener.listen(16)
        fd = listener.fileno()
        proc = procs.chaussette(
            "--protocol", "fastcgi", "--backend", engine, "--fd", str(fd), APP, pass_fds=(fd,)
        )
        address = listener.getsockname()
        wait_fcgi(address, proc)
    assert ok(fcgi_get(address, "/")) == b"hello"
    path = str(short_tmp / "f.sock")
    proc = procs.chaussette(
        "--protocol", "fastcgi", "--backend", engine, "--host", f"unix:{path}",
        "--socket-mode", "666", APP,
    )  # fmt: skip
    wait_fcgi(path, proc)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    environ = json.loads(ok(fcgi_get(path, "/?dump=1")))
    assert environ["SERVER_NAME"] == "localhost"
    assert proc.stop() == 0
    assert not Path(path).exists()


# -- the environ --


def test_environ_from_stock_nginx_params(server):
    _, address = server
    with FCGIClient(address) as client:
        # nginx's stock fastcgi_params: no PATH_INFO, the whole path as SCRIPT_NAME, empty
        # CONTENT_* on GET
        params = params_for("/a%20b/c?dump=1", SCRIPT_NAME="/a b/c", CONTENT_LENGTH="")
        params.update(CONTENT_TYPE="", HTTPS="on", HTTP_HOST="example.org:8443")
        del params["PATH_INFO"], params["SERVER_NAME"], params["SERVER_PORT"]
        environ = dump(client, params)
        assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("", "/a b/c")
        assert "CONTENT_LENGTH" not in environ and "CONTENT_TYPE" not in environ
        assert environ["wsgi.url_scheme"] == "https"
        assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("example.org", "8443")
        # mounted under SCRIPT_NAME, and the HTTP_CONTENT_* copies nginx sends on a POST
        params = params_for("/app/x/y?dump=1", "POST", b"data", SCRIPT_NAME="/app")
        params.update(HTTP_CONTENT_LENGTH="4", HTTP_CONTENT_TYPE="text/plain")
        del params["PATH_INFO"]
        client.begin(2, params, b"data")
        environ = json.loads(ok(client.result(2)))
        assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/app", "/x/y")
        assert environ["CONTENT_LENGTH"] == "4"
        assert "HTTP_CONTENT_LENGTH" not in environ and "HTTP_CONTENT_TYPE" not in environ


# -- the threads engine's request models --

MODELS = ["free", "free:max=2,timeout=0.5", "rplex", "single"]


@pytest.mark.parametrize("model", MODELS)
def test_request_model(procs, model, tmp_path):
    proc, address = start(procs, "threads", "--request-model", model)
    body = os.urandom(700_000)
    with FCGIClient(address) as client:
        answer = ok(client.request("/echo", "POST", body))
        assert answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        assert client.request("/error", request_id=2).cgi()[0] == 500
        streamed = client.request("/stream?n=3&pause=0.05", request_id=3)
        assert ok(streamed).endswith(b"chunk 0\nchunk 1\nchunk 2\n")
        assert len(streamed.pieces) >= 3  # one STDOUT record per app chunk
        both = client.begin_bytes(1, params_for("/slow?s=0.5"))
        client.send(both + client.begin_bytes(2, params_for("/")))
        if model == "single":  # one request at a time: the second is refused
            assert client.first_ended(1, 2) == 2
            assert client.results[2].protocol_status == fcgi.CANT_MPX_CONN
        else:
            assert client.first_ended(1, 2) == 2
            assert ok(client.results[2]) == b"hello"
        assert ok(client.result(1)) == b"slow done"
    mpxs = fcgi_values(address)[fcgi.FCGI_MPXS_CONNS]
    assert mpxs == (b"0" if model == "single" else b"1")
    if model.startswith("free:max=2"):  # idle threads exit after their timeout (0.5 s)
        busy = threads_of(proc)
        deadline = time.monotonic() + 10
        while threads_of(proc) >= busy and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threads_of(proc) < busy
        assert ok(fcgi_get(address, "/")) == b"hello"  # and come back when needed
    assert proc.stop() == 0


def threads_of(proc: Proc) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def test_free_max_stops_reading_new_requests_at_the_bound(procs):
    _, address = start(procs, "threads", "--request-model", "free:max=1")
    with FCGIClient(address) as client:
        client.begin(1, params_for("/slow?s=0.4"))
        client.begin(2, params_for("/"))  # waits for the only thread
        assert client.first_ended(1, 2) == 1
        assert ok(client.result(2)) == b"hello"


# -- raw handlers --


@pytest.mark.parametrize("engine", ENGINES)
def test_raw_handler(procs, engine):
    proc, address = start(procs, engine, "--raw-handler", app="tests.fcgi_client:raw_echo")
    with FCGIClient(address) as client:
        result = client.request("/x", "POST", b"raw body")
        status, _, body = result.cgi()
        assert (status, body, result.app_status) == (201, b"POST raw body", 7)
        assert result.stderr == b"raw handler saw 8 bytes\n"
    assert "raw handler saw 8 bytes" in proc.output()


# -- option checks --


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--backend", "gevent", "--request-model", "single"], ["--request-model", "threads"]),
        (["--request-model", "free:max=0"], ["--request-model free:max=0", "at least 1"]),
        (["--request-model", "rplex:max=3"], ["--request-model", "takes no parameters"]),
        (["--request-model", "loose"], ["unknown model 'loose'", "free[:max=N"]),
        (["--request-model", "free:max=2,idle=3"], ["bad parameter 'idle=3'"]),
    ],
)
def test_request_model_checked_in_one_line(args, fragments):
    settings = parse_args(["--protocol", "fastcgi", "--backend", "threads", *args])
    with pytest.raises(UsageError) as caught:
        check(settings)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("protocol", "backend", "args", "flag"),
    [
        ("http", "wsgiref", ["--max-conns", "3"], "--max-conns"),
        ("http", "wsgiref", ["--max-params-size", "300"], "--max-params-size"),
        ("http", "wsgiref", ["--raw-handler"], "--raw-handler"),
        ("http", "waitress", ["--request-model", "rplex"], "--request-model"),
        ("scgi", "threads", ["--max-reqs", "3"], "--max-reqs"),
    ],
)
def test_protocol_options_refused_elsewhere(protocol, backend, args, flag):
    settings = parse_args(["--protocol", protocol, "--backend", backend, *args])
    with pytest.raises(UsageError) as caught:
        check(settings)
    assert flag in str(caught.value) and f"--protocol {protocol}" in str(caught.value)


def test_request_model_parsing():
    assert parse_request_model("free").kind == "free"
    model = parse_request_model("free:max=4,timeout=2.5")
    assert (model.kind, model.max, model.timeout) == ("free", 4, 2.5)
    assert parse_request_model("rplex").max is None
    for good in ("single", "free:timeout=1", "free:max=1"):
        parse_request_model(good)


# -- bounds and timeouts --

POOL_ARGS = {
    "threads": ("--request-model", "free:max=2"),
    "gevent": ("--spawn", "2"),
    "eventlet": ("--spawn", "2"),
}


def get_soon(address: tuple[str, int]) -> Result:
    """GET / on a new connection, waiting at most 5 s for each read."""
    with FCGIClient(address, timeout=5) as client:
        return client.request("/")


@pytest.mark.parametrize("engine", ENGINES)
def test_silent_connections_take_no_request_slot(procs, engine):
    """As many connections as request slots, each sending half a record and then nothing:
    a good request on another connection is still answered."""
    _, address = start(procs, engine, *POOL_ARGS[engine])
    with FCGIClient(address) as one, FCGIClient(address) as two:
        for client in (one, two):
            client.send(fcgi.encode_begin_request(1)[:5])
        assert ok(get_soon(address)) == b"hello"


@pytest.mark.parametrize("engine", ENGINES)
def test_timeout_closes_a_connection_stuck_in_a_record(procs, engine):
    proc, address = start(procs, engine, "--timeout", "1")
    with FCGIClient(address) as stuck, FCGIClient(address) as other:
        stuck.send(fcgi.encode_begin_request(1) + fcgi.encode_begin_request(2)[:3])
        assert ok(other.request("/")) == b"hello"  # served meanwhile
        assert stuck.closed_by_server()  # each wait bounded by the client's 10 s
    assert ok(fcgi_get(address, "/")) == b"hello"
    assert "Traceback" not in proc.output()


def test_short_body_cuts_the_request_and_is_logged_once(server):
    proc, address = server
    seen = len(proc.output())
    with FCGIClient(address) as client:
        client.begin(1, params_for("/echo", "POST", b"x" * 100), body=None)
        client.send_body(1, b"abc", end=True)  # 3 bytes of the 100 announced, then the end
        assert client.closed_by_server()
        assert not client.results[1].ended  # no END_REQUEST: the peer sees it cut
        port = client.sock.getsockname()[1]
    assert ok(fcgi_get(address, "/")) == b"hello"
    lines = [
        line
        for line in proc.output()[seen:].splitlines()
        if "WARNING" in line or "went away" in line or "ERROR" in line
    ]
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0] and "3 of 100" in lines[0], lines
    assert "Traceback" not in proc.output()[seen:]


def test_short_body_beside_another_request_ends_with_app_status_1(server):
    _, address = server
    with FCGIClient(address) as client:
        client.begin(1, params_for("/slow?s=0.5"))
        client.begin(2, params_for("/echo", "POST", b"x" * 100), body=None)
        client.send_body(2, b"abc", end=True)
        result = client.result(2)
        assert (result.app_status, result.protocol_status) == (1, 0)
        assert ok(client.result(1)) == b"slow done"  # the connection goes on


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("engine", ENGINES)
def test_body_flood_on_one_connection_is_bounded(procs, engine):
    """800 requests on one connection, each with 250 000 body bytes the app never reads
    and no end of body: the server stops reading the connection (a budget of unread body
    bytes per connection) instead of buffering 200 MB, and still serves others."""
    proc, address = start(procs, engine)
    before = peak = rss_kb(proc.pid)
    body = b"x" * 250_000
    with FCGIClient(address, timeout=2) as flood:
        for request_id in range(1, 801):
            params = params_for("/slow?s=5", "POST", body + b"more")
            data = flood.begin_bytes(request_id, params, body=None)
            data += fcgi.encode_stream(fcgi.STDIN, request_id, body)
            try:
                flood.send(data)
            except TimeoutError:
                break  # the server stopped reading: what we want
            peak = max(peak, rss_kb(proc.pid))
        peak = max(peak, rss_kb(proc.pid))
        assert ok(get_soon(address)) == b"hello"
    assert (peak - before) < 64 * 1024, f"RSS grew by {(peak - before) // 1024} MB"


@pytest.mark.parametrize(
    ("protocol", "model", "expected"),
    [
        ("fastcgi", "single", "FastCGI request model single: one request at a time"),
        ("fastcgi", "free:max=3", "FastCGI request model free: at most 3 requests"),
        ("scgi", "rplex", "SCGI request model rplex: apps called in at most 10 threads"),
    ],
)
def test_startup_lines_say_the_request_model(procs, protocol, model, expected):
    port = free_port()
    proc = procs.chaussette(
        "--protocol", protocol, "--port", str(port), "--request-model", model, APP
    )
    proc.wait_for_output(expected)
    lines = proc.output().splitlines()
    serving = [line for line in lines if "serving" in line]
    assert len(serving) == 1 and "(--threads, --request-model)" in serving[0], serving
    multiplexing = protocol == "fastcgi" and model != "single"
    assert ("; multiplexing" in proc.output()) == multiplexing
    assert "multiplexing" not in serving[0]


@pytest.mark.parametrize("model", ["rplex", "single"])
def test_short_body_cuts_the_request_in_other_models(procs, model):
    proc, address = start(procs, "threads", "--request-model", model)
    with FCGIClient(address) as client:
        client.begin(1, params_for("/echo", "POST", b"x" * 100), body=None)
        client.send_body(1, b"abc", end=True)
        assert client.closed_by_server()
        assert not client.results[1].ended
    assert ok(fcgi_get(address, "/")) == b"hello"
    assert proc.output().count("body ended after 3 of 100 bytes") == 1
    assert "went away" not in proc.output()
