"""The Mongrel2 handler against a fake Mongrel2 made of real ZeroMQ sockets in the test.

The test binds what Mongrel2 binds (a PUSH for requests, a SUB for replies), sends request
messages made with the core's ``encode_request`` and reads the replies, so that it can send
what the real server only sends in rare cases: malformed messages, pipelined requests, a
disconnect in the middle of a response, upload messages for a file the test writes itself.
Also: the --zeromq / --m2-config parsing and the upload path checks, without processes.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from chaussette.drivers import m2config
from chaussette.drivers.m2config import UploadPlace, load_handler, parse_zeromq
from chaussette.drivers.m2upload import UploadRefused, resolve, spooled_length
from chaussette.errors import UsageError
from chaussette.protocols import mongrel2 as core
from tests.conftest import error_line, require_module, run_chaussette
from tests.mongrel2 import port_pair

require_module("zmq", "pip install 'chaussette[mongrel2]'")

import zmq  # noqa: E402

APP = "tests.apps.m2_app:application"
UUID = "0b3a6f3e-3c4e-4a3e-9d8b-1f2e3d4c5b6a"


def headers_for(target: str, method: str = "GET", version: str = "HTTP/1.1", **extra: str):
    path, _, query = target.partition("?")
    headers: dict[str, str | list[str]] = {
        "PATH": path,
        "METHOD": method,
        "VERSION": version,
        "URI": target,
        "PATTERN": "/",
        "REMOTE_ADDR": "127.0.0.1",
        "host": "localhost",
    }
    if query:
        headers["QUERY"] = query
    headers.update(extra)
    return headers


class FakeMongrel2:
    """Binds Mongrel2's two sockets; sends requests, collects replies per connection."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or port_pair()
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind(f"tcp://127.0.0.1:{self.port}")
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.bind(f"tcp://127.0.0.1:{self.port - 1}")
        self.frames: dict[str, list[bytes]] = {}

    @property
    def spec(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def send(self, conn_id: str, target: str, body: bytes = b"", json: bool = False, **kw):
        headers = headers_for(target, **kw)
        self.push.send(
            core.encode_request(UUID, conn_id, headers["PATH"], headers, body, json=json)
        )

    def send_raw(self, msg: bytes) -> None:
        self.push.send(msg)

    def disconnect(self, conn_id: str) -> None:
        self.push.send(
            core.encode_request(UUID, conn_id, "@*", {"METHOD": "JSON"}, b'{"type":"disconnect"}')
        )

    def poll(self, timeout: float) -> bool:
        """Take in replies for ``timeout`` seconds at most; True if any came."""
        if not self.sub.poll(int(timeout * 1000)):
            return False
        while True:
            try:
                msg = self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            sender, ids, payload = core.parse_reply(msg)
            assert sender == UUID
            for conn_id in ids:
                self.frames.setdefault(conn_id, []).append(payload)

    def wait(self, conn_id: str, predicate, timeout: float = 10) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while not predicate(self.frames.get(conn_id, [])):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"replies for {conn_id}: {self.frames.get(conn_id)}")
            self.poll(min(left, 0.1))
        return self.frames.get(conn_id, [])

    def response(self, conn_id: str, timeout: float = 10) -> bytes:
        """The bytes of one complete response (Content-Length or chunked framing)."""

        def complete(frames: list[bytes]) -> bool:
            data = b"".join(frames)
            head, sep, body = data.partition(b"\r\n\r\n")
            if not sep:
                return False
            if b"Transfer-Encoding: chunked" in head:
                return body.endswith(b"0\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    return len(body) >= int(line.split(b":")[1])
            return b"" in frames  # closed to end it

        return b"".join(self.wait(conn_id, complete, timeout))

    def closed(self, conn_id: str) -> bool:
        return b"" in self.frames.get(conn_id, [])

    def close(self) -> None:
        self.push.close()
        self.sub.close()
        self.ctx.term()


@pytest.fixture
def fake():
    m2 = FakeMongrel2()
    yield m2
    m2.close()


def start_handler(procs, fake: FakeMongrel2, *extra: str, backend: str = "threads"):
    proc = procs.chaussette(
        "--protocol", "mongrel2", "--backend", backend, "--zeromq", fake.spec, *extra, APP
    )
    # a bound SUB takes in a new connection (and sends it its subscription) only when it is
    # used: poll it while the handler connects, as Mongrel2's loop does
    deadline = time.monotonic() + 20
    while "connected to Mongrel2" not in proc.output():
        assert time.monotonic() < deadline and proc.popen.poll() is None, proc.output()
        fake.poll(0.05)
    return proc


def body_of(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("backend", ["threads", "gevent", "eventlet"])
def test_pipelined_requests_are_answered_in_order(procs, fake, backend):
    proc = start_handler(procs, fake, backend=backend)
    fake.send("7", "/slow?s=0.3")
    fake.send("7", "/")
    fake.send("7", "/pid")
    frames = fake.wait("7", lambda f: len(b"".join(f).split(b"HTTP/1.1 200")) >= 4)
    data = b"".join(frames)
    assert data.index(b"slow done") < data.index(b"hello") < data.index(str(proc.pid).encode())
    assert not fake.closed("7")
    assert "Traceback" not in proc.output()


@pytest.mark.parametrize("backend", ["threads", "gevent", "eventlet"])
def test_zeromq_io_thread_does_not_preempt_the_requests(procs, fake, backend):
    """ZeroMQ's I/O thread runs SCHED_BATCH (woken by a message, it waits for the request
    thread to yield instead of preempting it); the request threads keep the default."""
    proc = start_handler(procs, fake, backend=backend)
    fake.send("7", "/")
    fake.wait("7", lambda f: b"hello" in b"".join(f))
    policies: dict[str, set[int]] = {}
    for task in os.listdir(f"/proc/{proc.pid}/task"):
        name = Path(f"/proc/{proc.pid}/task/{task}/comm").read_text().strip()
        policies.setdefault(name, set()).add(os.sched_getscheduler(int(task)))
    io = {p for name, found in policies.items() if name.startswith("ZMQbg/IO") for p in found}
    assert io == {os.SCHED_BATCH}, policies
    assert policies["python"] == {os.SCHED_OTHER}, policies


def test_handler_waits_for_mongrel2_and_follows_its_restarts(procs):
    port = port_pair()
    proc = procs.chaussette("--protocol", "mongrel2", "--zeromq", f"tcp://127.0.0.1:{port}", APP)
    proc.wait_for_output("waiting for Mongrel2", timeout=20)
    for round_no in range(2):  # Mongrel2 comes up, goes away, comes back
        m2 = FakeMongrel2(port)
        try:
            deadline = time.monotonic() + 20
            while proc.output().count("connected to Mongrel2") <= round_no:
                assert time.monotonic() < deadline, proc.output()
                m2.poll(0.05)
            m2.send("1", "/")
            assert body_of(m2.response("1")) == b"hello"
            if round_no == 0:  # a response still running when Mongrel2 goes away
                m2.send("2", "/stream?n=500&pause=0.01")
                m2.wait("2", lambda f: len(f) > 2)
            else:  # is not given to the Mongrel2 that came back (connection 2 is new here)
                proc.wait_for_output("Mongrel2 went away since the request came", timeout=20)
                m2.poll(0.2)
                assert "2" not in m2.frames
        finally:
            m2.close()
        if round_no == 0:
            proc.wait_for_output("went away", timeout=20)
    assert "Traceback" not in proc.output()


def test_malformed_messages_are_logged_once_and_dropped(procs, fake):
    proc = start_handler(procs, fake)
    fake.send_raw(b"garbage")
    fake.send_raw(UUID.encode() + b" 12 /x 5:abc,}0:,")  # the headers are not a dict
    fake.send("13", "/")
    assert body_of(fake.response("13")) == b"hello"
    # the one with a connection id is answered 400 and closed; the other is only logged
    assert fake.response("12").startswith(b"HTTP/1.1 400 Bad Request")
    fake.wait("12", lambda f: b"" in f)
    out = proc.output()
    assert out.count("dropped a message Mongrel2 sent") == 1
    assert out.count("answered 400") == 1
    assert "Traceback" not in out


def test_json_headers_and_repeated_headers(procs, fake):
    proc = start_handler(procs, fake)
    fake.send("3", "/environ", json=True, **{"x-a": ["1", "2"]})  # type: ignore[arg-type]
    assert b'"HTTP_X_A": "1, 2"' in fake.response("3")
    assert "Traceback" not in proc.output()


def test_connection_closing_rules(procs, fake):
    start_handler(procs, fake)
    # HTTP/1.0 stream: no chunked encoding; the close ends it
    fake.send("1", "/stream?n=2&pause=0", version="HTTP/1.0")
    raw = b"".join(fake.wait("1", lambda f: b"" in f))
    assert raw.startswith(b"HTTP/1.0 200 OK") and raw.endswith(b"chunk 0\nchunk 1\n")
    # Connection: close on HTTP/1.1: the response, then the close
    fake.send("2", "/", connection="close")
    frames = fake.wait("2", lambda f: b"" in f)
    assert frames[-1] == b"" and b"Connection: close" in frames[0]
    # keep-alive: no close
    fake.send("3", "/")
    fake.response("3")
    fake.poll(0.3)
    assert not fake.closed("3")
    # the app fails mid-stream: the response is cut (no last chunk) and closed
    fake.send("4", "/error-mid")
    frames = fake.wait("4", lambda f: b"" in f)
    assert b"first part" in b"".join(frames) and not b"".join(frames).endswith(b"0\r\n\r\n")


def test_each_chunk_is_a_message_as_the_app_yields_it(procs, fake, short_tmp):
    start_handler(procs, fake)
    gate = short_tmp / "gate"
    fake.send("5", f"/gate?path={gate}")
    fake.wait("5", lambda f: b"first piece" in b"".join(f))
    assert b"second piece" not in b"".join(fake.frames["5"])
    gate.write_text("open")
    raw = fake.response("5")
    assert b"second piece" in raw and raw.endswith(b"0\r\n\r\n")


def test_disconnect_stops_the_response_and_closes_the_iterable(procs, fake, short_tmp):
    proc = start_handler(procs, fake)
    marker = short_tmp / "closed"
    fake.send("9", f"/closed?marker={marker}&n=100000&pause=0.01")
    fake.wait("9", lambda f: len(f) >= 3)
    fake.disconnect("9")
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        fake.poll(0.05)
    assert marker.read_text() == "closed"
    fake.poll(0.3)
    count = len(fake.frames["9"])
    fake.poll(0.3)
    assert len(fake.frames["9"]) == count  # nothing more for a client that is gone
    assert not fake.closed("9")  # a gone connection is not closed again
    fake.send("10", "/")
    assert body_of(fake.response("10")) == b"hello"
    assert "Traceback" not in proc.output()


def test_too_many_pipelined_requests_close_the_connection(procs, fake):
    proc = start_handler(procs, fake)
    for _ in range(40):
        fake.send("11", "/slow?s=0.2")
    fake.wait("11", lambda f: b"" in f)
    assert "requests ahead: closed" in proc.output()


def upload_headers(name: str, length: int, done: bool = False) -> dict[str, str]:
    headers = {core.UPLOAD_START: name, "content-length": str(length)}
    if done:
        headers[core.UPLOAD_DONE] = name
    return headers


def test_upload_is_read_while_it_is_written(procs, fake, short_tmp):
    uploads = short_tmp / "up"
    uploads.mkdir()
    proc = start_handler(procs, fake, "--upload-dir", str(uploads))
    spool = uploads / "upload.abc123"
    data = os.urandom(300_000)
    with open(spool, "wb") as f:
        f.write(data[:1000])
        f.flush()
        fake.send("20", "/echo", method="POST", **upload_headers(str(spool), len(data)))
        fake.poll(0.3)
        assert "20" not in fake.frames  # the app waits for the rest
        for start in range(1000, len(data), 50_000):
            f.write(data[start : start + 50_000])
            f.flush()
            time.sleep(0.02)
    raw = fake.response("20")
    assert body_of(raw) == f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
    deadline = time.monotonic() + 5
    while spool.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not spool.exists()
    # the done message that follows, and one for an upload this process never saw (PUSH
    # gave the start to another handler): neither is answered, no file is touched
    other = uploads / "upload.other1"
    other.write_bytes(b"someone else's")
    fake.send("20", "/echo", method="POST", **upload_headers(str(spool), len(data), True))
    fake.send("21", "/echo", method="POST", **upload_headers(str(other), 30_000, True))
    fake.poll(0.5)
    assert "21" not in fake.frames and other.read_bytes() == b"someone else's"
    # the same done with a Content-Length Mongrel2 passes inline: a client's request, 400
    fake.send("22", "/echo", method="POST", **upload_headers(str(other), 20480, True))
    assert fake.response("22").startswith(b"HTTP/1.1 400 Bad Request")
    fake.wait("22", lambda f: b"" in f)
    assert other.read_bytes() == b"someone else's"
    assert "Traceback" not in proc.output()


def test_upload_cut_short_by_the_done_message(procs, fake, short_tmp):
    uploads = short_tmp / "up"
    uploads.mkdir()
    proc = start_handler(procs, fake, "--upload-dir", str(uploads))
    spool = uploads / "upload.short1"
    spool.write_bytes(b"x" * 1000)
    fake.send("30", "/echo", method="POST", **upload_headers(str(spool), 25_000))
    fake.poll(0.2)
    fake.send("30", "/echo", method="POST", **upload_headers(str(spool), 25_000, True))
    # the app's read fails (the body is truncated): the request ends without an answer
    # from the app, and the spool file is removed
    deadline = time.monotonic() + 10
    while spool.exists() and time.monotonic() < deadline:
        fake.poll(0.05)
    assert not spool.exists()
    assert "ended 24000 bytes short" in proc.output()
    fake.send("31", "/")
    assert body_of(fake.response("31")) == b"hello"


def test_upload_paths_outside_the_directory_are_refused(procs, fake, short_tmp):
    uploads = short_tmp / "up"
    uploads.mkdir()
    secret = short_tmp / "secret"
    secret.write_bytes(b"secret")
    (uploads / "link").symlink_to(secret)
    (uploads / "sub").mkdir()
    (uploads / "sub" / "upload.x").write_bytes(b"nested")
    proc = start_handler(procs, fake, "--upload-dir", str(uploads))
    names = [str(secret), f"{uploads}/../secret", f"{uploads}/link", f"{uploads}/sub/upload.x"]
    names += ["", str(uploads), f"{uploads}/."]
    for number, name in enumerate(names, 40):
        conn = str(number)
        fake.send(conn, "/echo", method="POST", **upload_headers(name, 30_000))
        assert fake.response(conn).startswith(b"HTTP/1.1 400 Bad Request"), name
        fake.wait(conn, lambda f: b"" in f)
    assert secret.read_bytes() == b"secret" and (uploads / "link").is_symlink()
    assert (uploads / "sub" / "upload.x").read_bytes() == b"nested"
    assert proc.output().count("answered 400") == len(names)


# -- endpoints and the config database, without processes --


def test_parse_zeromq():
    assert parse_zeromq("tcp://127.0.0.1:9997") == m2config.Endpoints(
        "tcp://127.0.0.1:9997", "tcp://127.0.0.1:9996"
    )
    assert parse_zeromq("tcp://handler-1@*:9997") == m2config.Endpoints(
        "tcp://127.0.0.1:9997", "tcp://127.0.0.1:9996", "handler-1"
    )
    assert parse_zeromq("ipc:///run/a, ipc:///run/b") == m2config.Endpoints(
        "ipc:///run/a", "ipc:///run/b"
    )
    for bad in (
        "ipc:///run/a",
        "tcp://host",
        "tcp://h:1",
        "9997",
        "a,b,c",
        "tcp://@h:5",
        "udp://h:5",
    ):
        with pytest.raises(ValueError):
            parse_zeromq(bad)


def make_db(
    path: Path,
    chroot: str = "./",
    store: str | None = "tmp/upload.XXXXXX",
    limit: str | None = None,
) -> None:
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE server (id INTEGER PRIMARY KEY, uuid TEXT, chroot TEXT, port INTEGER);
        CREATE TABLE host (id INTEGER PRIMARY KEY, server_id INTEGER, name TEXT);
        CREATE TABLE handler (id INTEGER PRIMARY KEY, send_spec TEXT, send_ident TEXT,
            recv_spec TEXT, recv_ident TEXT, raw_payload INTEGER, protocol TEXT);
        CREATE TABLE route (id INTEGER PRIMARY KEY, path TEXT, reversed BOOLEAN,
            host_id INTEGER, target_id INTEGER, target_type TEXT);
        CREATE TABLE setting (id INTEGER PRIMARY KEY, key TEXT, value TEXT);
        """
    )
    db.execute("INSERT INTO server VALUES (1, 'u', ?, 80)", (chroot,))
    db.execute("INSERT INTO host VALUES (1, 1, 'a.example'), (2, 1, 'b.example')")
    db.execute(
        "INSERT INTO handler VALUES (1, 'tcp://*:9997', 'one', 'tcp://*:9996', '', 0, 'json'),"
        " (2, 'tcp://127.0.0.1:9995', 'two', 'tcp://127.0.0.1:9994', '', 0, 'tnetstring')"
    )
    db.execute(
        "INSERT INTO route VALUES (1, '/app', 0, 1, 1, 'handler'), (2, '/app', 0, 2, 2, 'handler'),"
        " (3, '/two', 0, 1, 2, 'handler'), (4, '/static/', 0, 1, 1, 'dir')"
    )
    if store:
        db.execute("INSERT INTO setting VALUES (1, 'upload.temp_store', ?)", (store,))
    if limit is not None:
        db.execute("INSERT INTO setting VALUES (2, 'limits.content_length', ?)", (limit,))
    db.commit()
    db.close()


def test_m2_config_selection(tmp_path):
    path = tmp_path / "config.sqlite"
    make_db(path)
    one = load_handler(str(path), "one")
    assert one.endpoints == m2config.Endpoints("tcp://127.0.0.1:9997", "tcp://127.0.0.1:9996")
    assert one.protocol == "json"
    assert one.upload == UploadPlace(str((tmp_path / "tmp").resolve()), str(tmp_path))
    assert load_handler(str(path), "/two").send_ident == "two"
    assert load_handler(str(path), "b.example/app").send_ident == "two"
    assert load_handler(str(path), "a.example/app").send_ident == "one"
    assert load_handler(str(path), "b.example").send_ident == "two"
    for selector, message in (
        (None, "has 2 handlers"),
        ("/app", "2 handlers match"),
        ("a.example", "2 handlers match"),
        ("/nothing", "no handler matches"),
        ("/static/", "no handler matches"),  # a Dir route is not a handler
    ):
        with pytest.raises(UsageError, match=message):
            load_handler(str(path), selector)
    with pytest.raises(UsageError, match="no such file"):
        load_handler(str(tmp_path / "missing.sqlite"), None)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(UsageError, match="not a Mongrel2 config database"):
        load_handler(str(tmp_path / "junk.sqlite"), None)
    assert not (tmp_path / "missing.sqlite").exists()  # opened read-only: never created


def test_m2_config_upload_place(tmp_path):
    path = tmp_path / "a.sqlite"
    make_db(path, chroot="/srv/m2", store="/tmp/m2.upload.XXXXXX")
    assert load_handler(str(path), "one").upload == UploadPlace("/srv/m2/tmp", "/srv/m2")
    path = tmp_path / "b.sqlite"
    make_db(path, store=None)
    assert load_handler(str(path), "one").upload == UploadPlace(None)
    # Mongrel2's limits.content_length: only bodies over it are spooled
    assert load_handler(str(path), "one").upload.content_limit == 20480  # unset: default
    path = tmp_path / "c.sqlite"
    make_db(path, limit="1000")
    assert load_handler(str(path), "one").upload.content_limit == 1000
    path = tmp_path / "d.sqlite"
    make_db(path, limit="lots")
    with pytest.raises(UsageError, match="'lots' is not a number"):
        load_handler(str(path), "one")


def test_spooled_length():
    place = UploadPlace("/srv/up", None, 1000)
    assert spooled_length(place, "1001") == 1001
    for bad in (None, "", "0", "1000", "-5", "1e4", " 2000", "\uff12\uff10\uff10\uff10", "9" * 30):
        with pytest.raises(UploadRefused):
            spooled_length(place, bad)


def test_resolve_upload_paths(tmp_path):
    (tmp_path / "up").mkdir()
    place = UploadPlace(str((tmp_path / "up").resolve()), str(tmp_path))
    assert resolve(place, "up/upload.1") == str((tmp_path / "up" / "upload.1").resolve())
    assert resolve(place, "/up/upload.1") == str((tmp_path / "up" / "upload.1").resolve())
    for bad in ("upload.1", "up", "up/", "up/../x", "up/a/upload.1", "", "up/\0"):
        with pytest.raises(UploadRefused):
            resolve(place, bad)
    with pytest.raises(UploadRefused, match="set --upload-dir"):
        resolve(UploadPlace(None), "up/upload.1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protocol", "mongrel2"], "needs the handler's endpoints"),
        (
            ["--protocol", "mongrel2", "--zeromq", "tcp://127.0.0.1:9997", "--port", "80"],
            "--port 80 does not apply",
        ),
        (
            ["--protocol", "mongrel2", "--zeromq", "tcp://127.0.0.1:9997", "--fd", "3"],
            "--fd 3 does not apply",
        ),
        (["--zeromq", "tcp://127.0.0.1:9997"], "--zeromq applies to --protocol mongrel2"),
        (["--protocol", "mongrel2", "--zeromq", "ipc:///x"], "RECV_SPEC can be left out"),
        (
            ["--protocol", "mongrel2", "--zeromq", "tcp://a@h:5", "--m2-identity", "b"],
            "give it once",
        ),
        (
            ["--protocol", "mongrel2", "--zeromq", "tcp://h:5", "--m2-handler", "/app"],
            "give --m2-config too",
        ),
        (
            ["--protocol", "mongrel2", "--zeromq", "tcp://h:5", "--m2-config", "c"],
            "cannot be used together",
        ),
        (["--protocol", "mongrel2", "--m2-config", "/nonexistent/c.sqlite"], "no such file"),
        (
            ["--protocol", "mongrel2", "--zeromq", "tcp://h:5", "--upload-dir", "/nonexistent"],
            "not a directory",
        ),
    ],
)
def test_option_errors(args, message):
    code, output = run_chaussette(*args, APP)
    assert code == 2, output
    assert message in error_line(output)
