"""``cgi-fcgi`` (Debian libfcgi-bin, the FastCGI reference library's own client) against
chaussette's FastCGI server: a second client, written independently of nginx.

``cgi-fcgi -bind -connect ADDR`` sends its whole environment as the request's params and
its stdin as the body, prints the raw CGI response (``Status:`` line, headers, body) and
exits with the app status of END_REQUEST, or 253 when the server answers FCGI_OVERLOADED.
It runs with a clean environment (``env -i``): only the params the test gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apps.gateway_app import FIRST, SECOND
from tests.conftest import connect, require_peer
from tests.nginx import Backend, public_dir

ENGINES = ("threads", "gevent", "eventlet")
TRANSPORTS = ("tcp", "unix")
OVERLOADED = 253  # cgi-fcgi's exit status for FCGI_OVERLOADED


class CgiFcgi:
    def __init__(self, program: str, backend: Backend) -> None:
        self.program, self.backend = program, backend
        address = backend.address
        self.target = address if isinstance(address, str) else f"{address[0]}:{address[1]}"

    def params(self, method: str, path: str, query: str = "", **extra: str) -> dict[str, str]:
        env = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        env.update(extra)
        return env

    def argv(self) -> list[str]:
        return [self.program, "-bind", "-connect", self.target]

    def run(self, params: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        done = subprocess.run(
            self.argv(),
            env=params,  # exactly these (env -i)
            input=body,
            capture_output=True,
            timeout=30,
        )
        return done.returncode, done.stdout

    def start(self, params: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv(),
            env=params,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )


def cgi_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """(status, headers, body) of a CGI response as the app's server wrote it."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {raw[:300]!r}"
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n"))
    return headers.pop("Status", ""), headers, body


def wait_listening(backend: Backend, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend.proc.popen.poll() is not None:
            raise AssertionError(f"chaussette exited:\n{backend.proc.output()}")
        try:
            connect(backend.address, timeout=2).close()
            return
        except OSError:
            time.sleep(0.03)
    raise AssertionError(f"chaussette not listening:\n{backend.proc.output()}")


@pytest.fixture(scope="module")
def program() -> str:
    return require_peer("cgi-fcgi", "libfcgi-bin")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = public_dir("chs-cgi-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(
    scope="module",
    params=[(e, t) for e in ENGINES for t in TRANSPORTS],
    ids=[f"{e}-{t}" for e in ENGINES for t in TRANSPORTS],
)
def client(request: pytest.FixtureRequest, program: str, workdir: Path) -> Iterator[CgiFcgi]:
    engine, transport = request.param
    directory = workdir / f"{engine}-{transport}"
    directory.mkdir()
    backend = Backend("fastcgi", engine, transport, directory)
    try:
        wait_listening(backend)
        yield CgiFcgi(program, backend)
    finally:
        code = backend.stop()
    assert code == 0, f"chaussette exited {code} after SIGTERM:\n{backend.proc.output()}"


def test_get(client: CgiFcgi) -> None:
    params = client.params("GET", "/environ", "a=1&b=2", HTTP_X_TRACE="abc", CONTENT_LENGTH="")
    code, out = client.run(params)
    assert code == 0, out
    status, headers, body = cgi_response(out)
    assert status == "200 OK"
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    env = json.loads(body)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == (
        "",
        "/environ",
        "a=1&b=2",
    )
    assert env["HTTP_X_TRACE"] == "abc"
    assert env.get("CONTENT_LENGTH", "") == ""  # empty means none


def test_post_body_on_stdin(client: CgiFcgi) -> None:
    body = hashlib.sha256(b"cgi-fcgi").digest() * 40000 + b"tail"  # 1.28 MB, many records
    params = client.params(
        "POST", "/echo", CONTENT_LENGTH=str(len(body)), CONTENT_TYPE="application/octet-stream"
    )
    code, out = client.run(params, body)
    assert code == 0, out
    status, _, answer = cgi_response(out)
    assert status == "200 OK"
    assert answer.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"


def test_post_lines(client: CgiFcgi) -> None:
    body = b"".join(b"%d\n" % i for i in range(5000))
    code, out = client.run(client.params("POST", "/lines", CONTENT_LENGTH=str(len(body))), body)
    assert code == 0
    assert cgi_response(out)[2] == b"5000"


def test_statuses(client: CgiFcgi) -> None:
    code, out = client.run(client.params("GET", "/nowhere"))
    assert (code, cgi_response(out)[0]) == (0, "404 Not Found")
    code, out = client.run(client.params("GET", "/error"))
    assert cgi_response(out)[0].startswith("500")
    code, out = client.run(client.params("GET", "/"))
    assert (code, cgi_response(out)[2]) == (0, b"hello")
    assert "boom before start_response" in client.backend.proc.output()


def test_big_response(client: CgiFcgi) -> None:
    size = 1_000_003  # several STDOUT records of at most 65535 bytes
    code, out = client.run(client.params("GET", "/big", f"size={size}"))
    assert code == 0
    assert cgi_response(out)[2] == b"b" * size


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 10) -> bytes:
    assert proc.stdout is not None
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise AssertionError(f"{marker!r} not received: {data[:300]!r}")
        more = os.read(proc.stdout.fileno(), 65536)
        if not more:
            raise AssertionError(f"cgi-fcgi closed before {marker!r}: {data[:300]!r}")
        data += more
    return data


def test_streamed_response(client: CgiFcgi, workdir: Path) -> None:
    """The first piece reaches cgi-fcgi while the app still holds the second."""
    gate = workdir / f"gate-{os.urandom(4).hex()}"
    proc = client.start(client.params("GET", "/gate", f"path={gate}"))
    try:
        got = _read_until(proc, FIRST)
        assert SECOND not in got
        gate.touch()
        rest, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert SECOND in got + rest


@pytest.mark.parametrize("engine", ENGINES)
def test_overloaded(program: str, workdir: Path, engine: str) -> None:
    """With ``--max-reqs 1`` and one request in flight, the next is answered
    FCGI_OVERLOADED (cgi-fcgi exits 253); once the first ends, requests are served again."""
    directory = workdir / f"overloaded-{engine}"
    directory.mkdir()
    backend = Backend("fastcgi", engine, "tcp", directory, "--max-reqs", "1")
    try:
        wait_listening(backend)
        cgi = CgiFcgi(program, backend)
        gate = directory / "gate"
        first = cgi.start(cgi.params("GET", "/gate", f"path={gate}"))
        try:
            _read_until(first, FIRST)  # the one allowed request is in flight
            code, out = cgi.run(cgi.params("GET", "/"))
            assert code == OVERLOADED, (code, out, backend.proc.output())
            gate.touch()
            rest, _ = first.communicate(timeout=20)
            assert SECOND in rest and first.returncode == 0
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate()
        code, out = cgi.run(cgi.params("GET", "/"))
        assert (code, cgi_response(out)[2]) == (0, b"hello")
    finally:
        assert backend.stop() == 0, backend.proc.output()
