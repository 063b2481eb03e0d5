"""The Mongrel2 devices (dispatcher, canned response), as real processes on real ZeroMQ
sockets.

In front of them: a fake Mongrel2 made of real sockets (a bound PUSH for requests, a bound
SUB for replies, messages from the protocol core's encoder and real captures in
tests/data/), and, in the tests at the end, the real ``mongrel2`` server.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_module

require_module("zmq", "pip install pyzmq")
import zmq  # noqa: E402

from chaussette.devices.canned import CannedResponse, Template  # noqa: E402
from chaussette.errors import UsageError  # noqa: E402
from chaussette.protocols import mongrel2  # noqa: E402
from tests.conftest import (  # noqa: E402
    TESTS,
    Conn,
    Proc,
    free_port,
    parse_response,
    request_bytes,
)

SENDER = "34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
WAIT_MS = 5000  # every receive is bounded
APP = "tests.apps.routes:application"


def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def headers_for(
    path: str = "/", method: str = "GET", version: str = "HTTP/1.1", **client: str
) -> dict[str, str | list[str]]:
    path_part, _, query = path.partition("?")
    headers: dict[str, str | list[str]] = {
        "PATH": path_part,
        "METHOD": method,
        "VERSION": version,
        "URI": path,
        "PATTERN": "/",
        "URL_SCHEME": "http",
        "REMOTE_ADDR": "127.0.0.1",
        "host": "localhost:6767",
    }
    if query:
        headers["QUERY"] = query
    headers.update({k.replace("_", "-"): v for k, v in client.items()})
    return headers


def request_msg(conn_id: str, path: str = "/", body: bytes = b"", **kw: Any) -> bytes:
    json = kw.pop("json", False)
    return mongrel2.encode_request(
        SENDER, conn_id, path.partition("?")[0], headers_for(path, **kw), body, json=json
    )


def disconnect_msg(conn_id: str) -> bytes:
    headers: dict[str, str | list[str]] = {"METHOD": "JSON"}
    return mongrel2.encode_request(SENDER, conn_id, "@*", headers, b'{"type":"disconnect"}')


def recv(sock: Any, timeout_ms: int = WAIT_MS) -> bytes:
    if not sock.poll(timeout_ms, zmq.POLLIN):
        raise AssertionError(f"nothing received within {timeout_ms} ms")
    data: bytes = sock.recv()
    return data


class FakeMongrel2:
    """Mongrel2's two sockets: requests out (PUSH, bound), replies in (SUB on our UUID)."""

    def __init__(self, context: Any) -> None:
        self.send_spec, self.recv_spec = endpoint(), endpoint()
        self.push = context.socket(zmq.PUSH)
        self.sub = context.socket(zmq.SUB)
        for sock in (self.push, self.sub):
            sock.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDTIMEO, WAIT_MS)
        self.sub.setsockopt(zmq.SUBSCRIBE, SENDER.encode())
        self.push.bind(self.send_spec)
        self.sub.bind(self.recv_spec)

    @property
    def zeromq(self) -> str:
        return f"{self.send_spec},{self.recv_spec}"

    def send(self, msg: bytes) -> None:
        self.push.send(msg)

    def wait_for_handler(self, proc: Proc, timeout: float = 15) -> None:
        """Until chaussette's handler says it is connected. A ZeroMQ socket acts on a new
        peer (here: sends it our subscription) only when its own thread calls it, as the
        real Mongrel2 does all the time: poll meanwhile."""
        deadline = time.monotonic() + timeout
        while "connected to Mongrel2:" not in proc.output():
            assert time.monotonic() < deadline and proc.popen.poll() is None, proc.output()
            self.sub.poll(20)

    def reply(self, timeout_ms: int = WAIT_MS) -> tuple[str, list[str], bytes]:
        return mongrel2.parse_reply(recv(self.sub, timeout_ms))

    def close(self) -> None:
        self.push.close()
        self.sub.close()


class FakeHandler:
    """A handler as chaussette's would connect: PULL to a slot, PUB to the replies."""

    def __init__(self, context: Any, slot: str, replies: str) -> None:
        self.pull = context.socket(zmq.PULL)
        self.pub = context.socket(zmq.PUB)
        for sock in (self.pull, self.pub):
            sock.setsockopt(zmq.LINGER, 0)
        self.pull.connect(slot)
        self.pub.connect(replies)

    def next(self, timeout_ms: int = WAIT_MS) -> mongrel2.Request:
        return mongrel2.parse_request(recv(self.pull, timeout_ms))

    def answer(self, request: mongrel2.Request, payload: bytes) -> None:
        self.pub.send(mongrel2.encode_reply(request.sender, [request.conn_id], payload))

    def close(self) -> None:
        self.pull.close()
        self.pub.close()


@pytest.fixture
def context() -> Iterator[Any]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def m2(context: Any) -> Iterator[FakeMongrel2]:
    fake = FakeMongrel2(context)
    yield fake
    fake.close()


def device(procs: Any, name: str, *args: str) -> Proc:
    return procs.start([sys.executable, "-m", f"chaussette.devices.{name}", *args])


def wait_output(proc: Proc, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.output().count(text) >= count:
            return
        if proc.popen.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"{text!r} x{count} not in output:\n{proc.output()}")


# -- the dispatcher with a fake Mongrel2 and fake handlers --


class Rig:
    """A dispatcher process between a fake Mongrel2 and ``n`` fake handlers."""

    def __init__(self, procs: Any, context: Any, m2: FakeMongrel2, rule: str, n: int = 2) -> None:
        self.context, self.m2 = context, m2
        self.slots = [endpoint() for _ in range(n)]
        self.replies = endpoint()
        self.proc = device(
            procs, "dispatcher", "--zeromq", m2.zeromq, "--handlers", ",".join(self.slots),
            "--replies", self.replies, "--rule", rule, "--log-level", "debug",
        )  # fmt: skip
        wait_output(self.proc, "routing requests")
        self.handlers: list[FakeHandler] = []
        for i in range(n):
            self.connect(i)

    def connect(self, slot: int) -> FakeHandler:
        handler = FakeHandler(self.context, self.slots[slot], self.replies)
        self.handlers.append(handler)
        wait_output(self.proc, "handler connected to slot", count=len(self.handlers))
        return handler

    def which(self, *handlers: FakeHandler) -> tuple[int, mongrel2.Request]:
        """The index (in ``handlers``) of the one that receives the next message, and it."""
        handlers = handlers or tuple(self.handlers)
        poller = zmq.Poller()
        for h in handlers:
            poller.register(h.pull, zmq.POLLIN)
        ready = dict(poller.poll(WAIT_MS))
        got = [i for i, h in enumerate(handlers) if h.pull in ready]
        assert got, "no handler got the message"
        i = got[0]
        return i, handlers[i].next()

    def warm_replies(self, handler: FakeHandler) -> None:
        """PUB/SUB drops messages until subscriptions travel: retry until one passes."""
        for attempt in range(100):
            conn = str(900000 + attempt)
            handler.pub.send(mongrel2.encode_reply(SENDER, [conn], b"ping"))
            with contextlib.suppress(AssertionError):
                sender, ids, payload = self.m2.reply(100)
                while ids != [conn]:  # an earlier ping came late
                    sender, ids, payload = self.m2.reply(100)
                assert (sender, payload) == (SENDER, b"ping")
                return
        raise AssertionError("replies never came through the dispatcher")

    def close(self) -> None:
        for h in self.handlers:
            h.close()


@pytest.fixture
def rig(procs: Any, context: Any, m2: FakeMongrel2) -> Iterator[Any]:
    made: list[Rig] = []

    def make(rule: str, n: int = 2) -> Rig:
        r = Rig(procs, context, m2, rule, n)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
        assert r.proc.stop() == 0, r.proc.output()
        assert "Traceback" not in r.proc.output()


def test_sticky_keeps_connections_on_one_handler(rig: Any) -> None:
    r = rig("sticky")
    owner: dict[str, int] = {}
    for conn in ["1", "2", "1", "3", "2", "4", "1", "3", "4", "2"]:
        r.m2.send(request_msg(conn, f"/c{conn}"))
        index, request = r.which()
        assert (request.conn_id, request.path) == (conn, f"/c{conn}")
        assert owner.setdefault(conn, index) == index, f"connection {conn} moved"
    assert set(owner.values()) == {0, 1}  # new connections are spread
    # a disconnect goes to its connection's handler only: the other's next message is
    # the request sent after it (one pipe keeps its order)
    other = 1 - owner["1"]
    r.m2.send(disconnect_msg("1"))
    mine = r.handlers[owner["1"]].next()
    assert mine.is_disconnect and mine.conn_id == "1"
    second = next(c for c, i in owner.items() if i == other)
    r.m2.send(request_msg(second, "/after"))
    assert r.handlers[other].next().path == "/after"


def test_replies_reach_mongrel2_unchanged(rig: Any) -> None:
    r = rig("sticky")
    r.warm_replies(r.handlers[0])
    r.warm_replies(r.handlers[1])
    r.m2.send(request_msg("7", "/hello"))
    index, request = r.which()
    payload = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    r.handlers[index].answer(request, payload)
    assert r.m2.reply() == (SENDER, ["7"], payload)
    r.handlers[index].answer(request, b"")  # close: forwarded as well
    assert r.m2.reply() == (SENDER, ["7"], b"")


def test_round_robin_and_upload_pairs(rig: Any) -> None:
    r = rig("round-robin")
    seen = []
    for _ in range(4):
        r.m2.send(request_msg("1"))
        seen.append(r.which()[0])
    assert seen in ([0, 1, 0, 1], [1, 0, 1, 0])
    # the two messages of an async upload go to one handler, whatever came between
    start = headers_for("/up", "POST", **{"x_mongrel2_upload_start": "tmp/upload.abc"})
    r.m2.send(mongrel2.encode_request(SENDER, "9", "/up", start))
    first, _ = r.which()
    for conn in ("10", "11"):  # without pairing, the turn would now be the other's
        r.m2.send(request_msg(conn))
        r.which()
    done = dict(start, **{"x-mongrel2-upload-done": "tmp/upload.abc"})
    r.m2.send(mongrel2.encode_request(SENDER, "9", "/up", done))
    index, request = r.which()
    assert index == first and request.upload_done == "tmp/upload.abc"
    # with no table of owners, a disconnect goes to every handler
    r.m2.send(disconnect_msg("1"))
    assert r.handlers[0].next().is_disconnect and r.handlers[1].next().is_disconnect


def test_handler_leaving_and_arriving(rig: Any) -> None:
    r = rig("sticky")
    r.m2.send(request_msg("1"))
    first, _ = r.which()
    r.handlers[first].close()
    wait_output(r.proc, "handler left slot")
    # its connection and every new one go to the handler that is left
    for conn in ["1", "2", "3"]:
        r.m2.send(request_msg(conn))
        assert r.which(r.handlers[1 - first])[1].conn_id == conn
    r.handlers.pop(first)
    r.handlers.append(FakeHandler(r.context, r.slots[first], r.replies))
    wait_output(r.proc, "handler connected to slot", count=3)
    got = set()
    for conn in ["4", "5", "6", "7"]:
        r.m2.send(request_msg(conn))
        got.add(r.which()[0])
    assert got == {0, 1}


def test_no_handler_requests_wait(procs: Any, context: Any, m2: FakeMongrel2) -> None:
    slot, replies = endpoint(), endpoint()
    proc = device(
        procs, "dispatcher", "--zeromq", m2.zeromq, "--handlers", slot, "--replies", replies
    )
    wait_output(proc, "no handler connected")
    m2.send(request_msg("1", "/waited"))
    handler = FakeHandler(context, slot, replies)
    try:
        assert handler.next().path == "/waited"
    finally:
        handler.close()
    assert proc.stop() == 0


def test_malformed_message_dropped_and_logged(rig: Any) -> None:
    r = rig("sticky")
    r.m2.send(b"garbage with no structure")
    r.m2.send(request_msg("1", "/fine"))
    assert r.which()[1].path == "/fine"
    wait_output(r.proc, "dropped a malformed message from Mongrel2")


def test_real_captured_messages_routed(rig: Any) -> None:
    """Messages captured from the real Mongrel2 (tnetstring and JSON headers)."""
    r = rig("sticky")
    for name in ["mongrel2_tnet_get.bin", "mongrel2_json_get.bin", "mongrel2_tnet_post.bin"]:
        raw = (TESTS / "data" / name).read_bytes()
        r.m2.send(raw)
        index, _ = r.which()
        assert mongrel2.parse_request(raw).path  # the device forwarded it byte for byte
        r.m2.send(raw)
        index2, _ = r.which()
        assert index2 == index  # same connection id: same handler


H = "tcp://127.0.0.1:"  # ports that are never bound: the errors come first


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--zeromq", "nonsense", "--handlers", H + "1", "--replies", H + "2"],
         "--zeromq 'nonsense': 'nonsense' is not an endpoint"),
        (["--zeromq", H + "3", "--handlers", H + "1", "--replies", H + "2", "--rule", "random"],
         "argument --rule: invalid choice"),
        (["--zeromq", "ipc:///tmp/x", "--handlers", H + "1", "--replies", H + "2"],
         "RECV_SPEC can be left out for tcp:// only"),
    ],
)  # fmt: skip
def test_dispatcher_usage_errors(args: list[str], expected: str) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "chaussette.devices.dispatcher", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=TESTS.parent,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr


# -- the canned response device --


def fake_request(path: str = "/", method: str = "GET", version: str = "HTTP/1.1", **client: str):
    return mongrel2.parse_request(request_msg("5", path, method=method, version=version, **client))


def test_template_interpolates_safely() -> None:
    t = Template("{method} {path}?{query} {header:user-agent} {{literal}} {conn_id}", "--body")
    request = fake_request("/a/b?x=1", user_agent="curl/8")
    assert t.render(request) == "GET /a/b?x=1 curl/8 {literal} 5"
    assert (
        Template("{header:missing}|{path|html}", "--body").render(fake_request("/<script>"))
        == "|/&lt;script&gt;"
    )


@pytest.mark.parametrize(
    "text",
    [
        "{path.__class__}",
        "{path[0]}",
        "{0}",
        "{}",
        "{method!r}",
        "{header}",
        "{path:x}",
        "{header:host.__init__}",
        "{path|upper}",
        "{nosuch}",
        "a { b",
        "a } b",
    ],
)
def test_template_rejects_anything_but_variables(text: str) -> None:
    with pytest.raises(UsageError):
        Template(text, "--body")


def test_canned_headers_cannot_be_injected() -> None:
    canned = CannedResponse(
        "200 OK", ["X-Echo: {header:x-evil}", "Content-Type: text/html"], "{path|html}"
    )
    request = fake_request("/<b>", x_evil="a\r\nSet-Cookie: pwned=1")
    payload, close = canned.render(request)
    resp = parse_response(payload)
    assert resp.header("X-Echo") == "aSet-Cookie: pwned=1"
    assert resp.header("Set-Cookie") is None
    assert resp.body == b"/&lt;b&gt;"
    assert not close
    for bad in (["Content-Length: 3"], ["Connection: close"], ["Bad Header: x"], ["X: a\rb"]):
        with pytest.raises(UsageError):
            CannedResponse("200 OK", bad, "")
    with pytest.raises(UsageError):
        CannedResponse("OK", [], "")
    with pytest.raises(UsageError):
        CannedResponse("200 \u2713", [], "")  # a status line is latin-1 text


@pytest.fixture
def canned(procs: Any, m2: FakeMongrel2) -> Any:
    def start(*args: str) -> Proc:
        proc = device(procs, "canned", "--zeromq", m2.zeromq, *args)
        wait_output(proc, "answering requests")
        for attempt in range(100):  # PUB/SUB: retry until the first reply passes
            m2.send(request_msg(str(800000 + attempt), "/warm"))
            with contextlib.suppress(AssertionError):
                m2.reply(100)
                break
        time.sleep(0.2)  # let late warm-up replies arrive, then drop them
        with contextlib.suppress(AssertionError):
            while True:
                m2.reply(50)
        return proc

    return start


def test_canned_device_answers(canned: Any, m2: FakeMongrel2) -> None:
    proc = canned(
        "--status", "503 Service Unavailable", "--header", "Retry-After: 120",
        "--header", "X-Seen: {method} {header:host}",
        "--body", "{host|html} is down; {path|html} soon. é {{ok}}\n",
    )  # fmt: skip
    m2.send(request_msg("42", "/page?x=1", user_agent="t"))
    sender, ids, payload = m2.reply()
    assert (sender, ids) == (SENDER, ["42"])
    resp = parse_response(payload)
    assert (resp.status, resp.header("Retry-After")) == (503, "120")
    assert resp.header("X-Seen") == "GET localhost:6767"
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert resp.body == "localhost:6767 is down; /page soon. é {ok}\n".encode()
    assert payload.startswith(b"HTTP/1.1 503 ")
    # HEAD: the same headers, no body
    m2.send(request_msg("43", "/", method="HEAD"))
    _, _, payload = m2.reply()
    head, _, rest = payload.partition(b"\r\n\r\n")
    assert b"Content-Length: " in head and rest == b""
    # JSON headers as well as tnetstring
    m2.send(request_msg("44", "/json", json=True))
    assert parse_response(m2.reply()[2]).body.startswith(b"localhost:6767 is down; /json")
    assert proc.stop() == 0


def test_canned_device_closes_when_http_says_so(canned: Any, m2: FakeMongrel2) -> None:
    canned("--body", "bye")
    m2.send(request_msg("50", "/", version="HTTP/1.0"))
    payload = m2.reply()[2]
    assert payload.startswith(b"HTTP/1.0 200 OK") and b"Connection: close" in payload
    assert m2.reply() == (SENDER, ["50"], b"")  # and the close for Mongrel2
    m2.send(request_msg("51", "/", version="HTTP/1.0", connection="keep-alive"))
    assert b"Connection: keep-alive" in m2.reply()[2]
    m2.send(request_msg("52", "/", connection="close"))
    assert b"Connection: close" in m2.reply()[2]
    assert m2.reply() == (SENDER, ["52"], b"")


def test_canned_device_uploads_and_garbage(canned: Any, m2: FakeMongrel2, tmp_path: Path) -> None:
    proc = canned("--body", "got {body_length}")
    spool = tmp_path / "upload.x"
    spool.write_bytes(b"precious")
    start = headers_for("/up", "POST", **{"x_mongrel2_upload_start": str(spool)})
    m2.send(mongrel2.encode_request(SENDER, "60", "/up", start))  # not answered yet
    m2.send(b"garbage")  # dropped, logged
    done = dict(start, **{"x-mongrel2-upload-done": str(spool)})
    m2.send(mongrel2.encode_request(SENDER, "60", "/up", done))
    _, ids, payload = m2.reply()
    assert ids == ["60"] and parse_response(payload).body == b"got 0"
    assert spool.read_bytes() == b"precious"  # the device never deletes a file
    forged = dict(headers_for("/up", "POST"), **{"x-mongrel2-upload-done": "/etc/passwd"})
    m2.send(mongrel2.encode_request(SENDER, "61", "/up", forged))
    _, ids, payload = m2.reply()
    assert ids == ["61"] and parse_response(payload).status == 400
    m2.send(disconnect_msg("61"))  # ignored: the next reply is for the next request
    m2.send(request_msg("62"))
    assert m2.reply()[1] == ["62"]
    assert "dropped a malformed message" in proc.output()


def test_canned_usage_errors() -> None:
    import subprocess

    for args, expected in [
        (["--zeromq", H + "9", "--body", "{path.__class__.__init__}"], "is not a variable"),
        (["--zeromq", H + "9", "--header", "Content-Length: 1"], "set by the device"),
        (["--zeromq", H + "9", "--body-file", "/nonexistent/x"], "--body-file"),
        (["--zeromq", H + "9", "--status", "200 \u2713"], "latin-1"),
    ]:  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "chaussette.devices.canned", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=TESTS.parent,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], done.stderr


def test_sticky_table_is_bounded_and_forgets_closed(context: Any, m2: FakeMongrel2) -> None:
    """In-process, to look at the table: an LRU of --max-connections entries; a handler's
    close (empty reply) and Mongrel2's disconnect remove the connection."""
    import threading

    from chaussette.devices.common import Endpoint, parse_pair
    from chaussette.devices.dispatcher import Dispatcher

    slot, replies = endpoint(), endpoint()
    d = Dispatcher(
        parse_pair(m2.zeromq, "--zeromq"), [Endpoint(slot)], Endpoint(replies),
        max_connections=3, context=context,
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop.is_set,))
    thread.start()
    handler = FakeHandler(context, slot, replies)
    try:
        for conn in ["1", "2", "3", "1", "4"]:  # 1 used again: 2 is the oldest
            m2.send(request_msg(conn))
            handler.next()
        assert list(d.sticky) == [(SENDER, "3"), (SENDER, "1"), (SENDER, "4")]
        for _ in range(100):  # a close from the handler; PUB/SUB needs a warm-up
            handler.pub.send(mongrel2.encode_reply(SENDER, ["3"], b""))
            with contextlib.suppress(AssertionError):
                assert m2.reply(100) == (SENDER, ["3"], b"")
                break
        else:
            raise AssertionError("the close never reached Mongrel2")
        assert list(d.sticky) == [(SENDER, "1"), (SENDER, "4")]
        m2.send(disconnect_msg("4"))
        assert handler.next().is_disconnect
        assert list(d.sticky) == [(SENDER, "1")]
    finally:
        handler.close()
        stop.set()
        thread.join(10)
        d.close()


# -- with chaussette's own Mongrel2 handlers behind the dispatcher --


def roundtrip(m2: FakeMongrel2, conn: str, path: str, timeout_ms: int = WAIT_MS) -> bytes:
    m2.send(request_msg(conn, path))
    for _ in range(10):  # skip late answers to warm-up requests
        _, ids, payload = m2.reply(timeout_ms)
        if ids == [conn]:
            return parse_response(payload).body
    raise AssertionError(f"no reply for connection {conn}")


def warm_up(m2: FakeMongrel2, path: str = "/pid") -> None:
    """PUB/SUB drops replies until every subscription has travelled: retry with new
    connection ids until one request comes back."""
    for attempt in range(100):
        with contextlib.suppress(AssertionError):
            roundtrip(m2, str(700000 + attempt), path, timeout_ms=200)
            return
    raise AssertionError("no reply through the dispatcher")


def test_dispatcher_with_chaussette_handlers(procs: Any, m2: FakeMongrel2) -> None:
    slots, replies = [endpoint(), endpoint()], endpoint()
    dispatcher = device(
        procs, "dispatcher", "--zeromq", m2.zeromq, "--handlers", ",".join(slots),
        "--replies", replies,
    )  # fmt: skip
    handlers = [
        procs.chaussette(
            "--protocol", "mongrel2", "--zeromq", f"{slot},{replies}", "tests.apps.routes:app"
        )
        for slot in slots
    ]
    for handler in handlers:
        handler.wait_for_output("connected to Mongrel2:")
    wait_output(dispatcher, "handler connected to slot", count=2)
    warm_up(m2)
    pids: dict[str, set[bytes]] = {}
    for conn in ["1", "2", "3", "4"] * 3:
        pids.setdefault(conn, set()).add(roundtrip(m2, conn, "/pid"))
    assert all(len(p) == 1 for p in pids.values()), pids  # sticky
    assert {str(h.pid).encode() for h in handlers} == set().union(*pids.values())
    for proc in [*handlers, dispatcher]:
        assert proc.stop() == 0, proc.output()


# -- with the real Mongrel2 in front --


@pytest.fixture(scope="module")
def real_m2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.mongrel2 import start_mongrel2

    server = start_mongrel2(tmp_path_factory.mktemp("m2dev"))
    yield server
    server.stop()


def pid_on(conn: Any, path: str = "/app/pid") -> bytes:
    conn.send(request_bytes("GET", path, close=False))
    resp = conn.response()
    assert resp.status == 200, resp.raw
    return resp.body


@pytest.mark.parametrize("rule", ["sticky", "round-robin"])
def test_dispatcher_behind_real_mongrel2(procs: Any, real_m2: Any, rule: str) -> None:
    from tests.mongrel2 import wait_handler

    slots, replies = [endpoint(), endpoint()], endpoint()
    dispatcher = device(
        procs, "dispatcher", "--zeromq", real_m2.tnet, "--handlers", ",".join(slots),
        "--replies", replies, "--rule", rule,
    )  # fmt: skip
    handlers = [
        procs.chaussette("--protocol", "mongrel2", "--zeromq", f"{slot},{replies}", APP)
        for slot in slots
    ]
    for handler in handlers:
        handler.wait_for_output("connected to Mongrel2:")
    wait_output(dispatcher, "handler connected to slot", count=2)
    wait_output(dispatcher, "connected to Mongrel2: replies to")  # it subscribed
    wait_handler(real_m2, handlers[0], "/app/pid")
    pids = {str(h.pid).encode() for h in handlers}
    with Conn(real_m2.address) as conn:  # one keep-alive client connection
        seen = [pid_on(conn) for _ in range(4)]
    if rule == "sticky":
        assert len(set(seen)) == 1, seen
        firsts = set()
        for _ in range(4):  # new connections are spread over the handlers
            with Conn(real_m2.address) as conn:
                firsts.add(pid_on(conn))
        assert firsts == pids
    else:
        assert set(seen) == pids
    for proc in [*handlers, dispatcher]:
        assert proc.stop() == 0, proc.output()
        assert "Traceback" not in proc.output()


def test_canned_behind_real_mongrel2(procs: Any, real_m2: Any) -> None:
    from tests.mongrel2 import wait_handler

    proc = device(
        procs, "canned", "--zeromq", real_m2.json, "--header", "X-Agent: {header:user-agent}",
        "--body", "{method} {path} {query} via {scheme}://{host|html}\n",
    )  # fmt: skip
    wait_handler(real_m2, proc, "/json/ready")
    with Conn(real_m2.address) as conn:
        conn.send(request_bytes("GET", "/json/a/b?x=1", "User-Agent: t/1", close=False))
        resp = conn.response()
        assert resp.header("X-Agent") == "t/1"
        assert resp.body == b"GET /json/a/b x=1 via http://localhost\n"
        conn.send(request_bytes("HEAD", "/json/", close=False))
        head = conn.response(head_only=True)
        assert head.status == 200 and head.header("Content-Length")
    with Conn(real_m2.address) as conn:  # HTTP/1.0: answered, then closed by the device
        conn.send(b"GET /json/old HTTP/1.0\r\nHost: localhost\r\n\r\n")
        raw = conn.read_to_eof()
        assert raw.startswith(b"HTTP/1.0 200 OK") and raw.endswith(
            b"GET /json/old  via http://localhost\n"
        )
    assert proc.stop() == 0


# -- credit mode: the dispatcher in-process, real ZeroMQ sockets around it -------------------


class CreditRig:
    """A CreditDispatcher between a fake Mongrel2 (PUSH) and DEALER handlers; ``pump``
    turns the dispatcher's loop until ``check()`` holds (bounded)."""

    def __init__(self, context: Any, m2: FakeMongrel2, max_queue: int = 100) -> None:
        from chaussette.devices.common import Endpoint
        from chaussette.devices.dispatcher import CreditDispatcher

        self.context = context
        self.m2 = m2
        self.address = endpoint()
        self.dispatcher = CreditDispatcher(
            Endpoint(m2.send_spec), Endpoint(self.address), max_queue=max_queue, context=context
        )
        self.dealers: list[Any] = []

    def handler(self, credit: int) -> Any:
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.address)
        self.dealers.append(dealer)
        if credit:
            dealer.send(b"READY %d" % credit)
        return dealer

    def pump(self, check: Any, what: str, rounds: int = 250) -> None:
        for _ in range(rounds):
            if check():
                return
            self.dispatcher.step(20)
        raise AssertionError(f"{what}: not after {rounds} rounds")

    def settle(self, rounds: int = 10) -> None:
        for _ in range(rounds):
            self.dispatcher.step(10)

    def close(self) -> None:
        for dealer in self.dealers:
            dealer.close()
        self.dispatcher.close()


def take(dealer: Any) -> list[bytes]:
    """Every message the dealer has now."""
    got = []
    while dealer.poll(0, zmq.POLLIN):
        frames = dealer.recv_multipart()
        got.append(frames[0] if len(frames) == 1 else b"|".join(frames))
    return got


@pytest.fixture
def credit_rig(context: Any, m2: FakeMongrel2) -> Iterator[CreditRig]:
    rig = CreditRig(context, m2)
    yield rig
    rig.close()


def test_credit_requests_only_to_handlers_that_asked(credit_rig: CreditRig) -> None:
    rig = credit_rig
    a, b = rig.handler(2), rig.handler(1)
    rig.pump(lambda: rig.dispatcher.credit == 3, "credit from both handlers")
    for n in range(5):
        rig.m2.send(request_msg(str(n)))
    rig.pump(lambda: len(rig.dispatcher.queue) == 2, "three given, two queued")
    rig.settle()
    got_a, got_b = take(a), take(b)
    assert len(got_a) == 2 and len(got_b) == 1, (got_a, got_b)
    assert rig.dispatcher.credit == 0 and len(rig.dispatcher.queue) == 2
    # one more credit: the oldest queued request, at once
    b.send(b"READY 1")
    rig.pump(lambda: len(rig.dispatcher.queue) == 1, "a queued request given")
    rig.settle()
    assert [mongrel2.parse_request(m).conn_id for m in take(b)] == ["3"]
    assert take(a) == []
    # a malformed credit is ignored (and logged)
    a.send(b"READY lots")
    rig.settle()
    assert take(a) == [] and rig.dispatcher.credit == 0


def test_credit_round_robin_and_disconnect_to_owner(credit_rig: CreditRig) -> None:
    rig = credit_rig
    a, b = rig.handler(10), rig.handler(10)
    rig.pump(lambda: rig.dispatcher.credit == 20, "credit")
    for n in range(6):
        rig.m2.send(request_msg(str(n)))
    rig.pump(lambda: rig.dispatcher.credit == 14, "six given")
    rig.settle()
    ids_a = [mongrel2.parse_request(m).conn_id for m in take(a)]
    ids_b = [mongrel2.parse_request(m).conn_id for m in take(b)]
    assert len(ids_a) == len(ids_b) == 3, (ids_a, ids_b)
    # a disconnect notice goes to the handler that has that connection only
    rig.m2.send(disconnect_msg(ids_b[1]))
    rig.pump(lambda: rig.dispatcher.credit == 13, "disconnect given")
    rig.settle()
    assert take(a) == []
    notice = mongrel2.parse_request(take(b)[0])
    assert notice.is_disconnect and notice.conn_id == ids_b[1]


def test_credit_goodbye_is_answered_and_nothing_follows(credit_rig: CreditRig) -> None:
    rig = credit_rig
    a, b = rig.handler(5), rig.handler(5)
    rig.pump(lambda: rig.dispatcher.credit == 10, "credit")
    b.send(b"BYE")
    rig.pump(lambda: b.poll(0, zmq.POLLIN), "goodbye answered")
    assert take(b) == [b"|BYE"]
    assert rig.dispatcher.credit == 5
    for n in range(5):
        rig.m2.send(request_msg(str(n)))
    rig.pump(lambda: rig.dispatcher.credit == 0, "all to the handler that stays")
    rig.settle()
    assert len(take(a)) == 5 and take(b) == []


def test_credit_vanished_handler_and_bounded_queue(context: Any, m2: FakeMongrel2) -> None:
    rig = CreditRig(context, m2, max_queue=2)
    try:
        a = rig.handler(3)
        rig.pump(lambda: rig.dispatcher.credit == 3, "credit")
        # killed without a goodbye: its connection ends, its credit is worthless
        a.close()
        rig.dealers.remove(a)
        time.sleep(0.2)  # ZeroMQ's I/O thread sees the connection end (not a pass/fail wait)
        for n in range(4):
            m2.send(request_msg(str(n)))
        rig.pump(lambda: rig.dispatcher.dropped == 2, "queue full: two dropped")
        assert rig.dispatcher.credit == 0 and len(rig.dispatcher.queue) == 2
        b = rig.handler(5)
        rig.pump(lambda: not rig.dispatcher.queue, "queued requests given to a new handler")
        rig.settle()
        assert [mongrel2.parse_request(m).conn_id for m in take(b)] == ["0", "1"]  # oldest kept
    finally:
        rig.close()


def test_credit_cli_refuses_mixed_modes(procs: Any) -> None:
    proc = device(
        procs,
        "dispatcher",
        "--zeromq",
        endpoint(),
        "--credit",
        endpoint(),
        "--handlers",
        endpoint(),
    )
    assert proc.wait(15) == 2
    assert "--credit replaces --handlers and --replies" in proc.output()
