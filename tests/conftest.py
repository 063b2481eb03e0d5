"""Shared test harness: real chaussette processes on real sockets.

- ``Proc``: a ``python -m chaussette ...`` child, output captured to a file (never a pipe
  that could fill), stopped and reaped at teardown.
- ``http_request``: a tiny raw HTTP/1.1 client over TCP or a unix socket.
- ``require_peer``: a system program the test needs; skips when absent unless
  CHAUSSETTE_REQUIRE_PEERS=1, where a missing peer fails.
- ``short_tmp``: a short temp dir for unix sockets (paths must be < 108 bytes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
ROUTES_APP = "tests.apps.routes:application"
REQUIRE_PEERS = os.environ.get("CHAUSSETTE_REQUIRE_PEERS") == "1"


def require_peer(program: str, package: str) -> str:
    """Path of a system program; skip (or fail under CHAUSSETTE_REQUIRE_PEERS=1) if absent."""
    path = shutil.which(program)
    if path is None:
        message = f"{program} not found: apt-get install {package}"
        if REQUIRE_PEERS:
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str, install: str) -> None:
    """An optional library a test needs (built with system packages, like bjoern): skip
    naming how to install it, or fail under CHAUSSETTE_REQUIRE_PEERS=1."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        message = f"{name} is not installed: {install}"
        if REQUIRE_PEERS:
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


def free_port(family: int = socket.AF_INET) -> int:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def chaussette_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "chaussette", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("CHAUSSETTE_REQUIRE_PEERS", None)
    # A user's Python caches bytecode; so must the processes under test (stale-.pyc bugs
    # only show then), whatever the shell running the tests says.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for key in list(env):
        if key.startswith("CHAUSSETTE_") or key.startswith("LISTEN_") or key == "NOTIFY_SOCKET":
            env.pop(key)
    if extra:
        env.update(extra)
    return env


def run_chaussette(
    *args: str, env: dict[str, str] | None = None, cwd: str | Path = ROOT, timeout: float = 60
) -> tuple[int, str]:
    """Run chaussette to its end (it must not serve); exit code and all its output."""
    done = subprocess.run(
        chaussette_cmd(*args),
        cwd=str(cwd),
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )
    return done.returncode, done.stdout.decode(errors="replace")


def error_line(output: str) -> str:
    """The one ``chaussette: error:`` line, which must also be the last line of output."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("chaussette: error:")]
    assert len(errors) == 1, output
    assert lines[-1] == errors[0], output
    return errors[0]


T = TypeVar("T")


class Proc:
    """A running chaussette (or other) process with its output in a file."""

    def __init__(
        self,
        args: list[str],
        *,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        log_dir: Path | None = None,
    ) -> None:
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="chs-log-"))
        self.log_path = log_dir / f"proc-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.args = args
        self.popen = subprocess.Popen(
            args,
            cwd=str(cwd or ROOT),
            env=env if env is not None else child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            pass_fds=pass_fds,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        return self.popen.wait(timeout)

    def wait_for_output(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.popen.poll() is not None and text not in self.output():
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in output of {self.args}:\n{self.output()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


def connect(address: tuple[str, int] | str, timeout: float = 10) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class HTTPResponse:
    def __init__(
        self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, raw: bytes
    ) -> None:
        self.status, self.reason, self.headers, self.body, self.raw = (
            status,
            reason,
            headers,
            body,
            raw,
        )

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def parse_response(raw: bytes, head_only: bool = False) -> HTTPResponse:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"incomplete response: {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    resp = HTTPResponse(int(status), reason, headers, b"", raw)  # type: ignore[arg-type]
    if head_only:
        resp.body = rest
    elif (resp.header("transfer-encoding") or "").lower() == "chunked":
        resp.body = dechunk(rest)
    elif resp.header("content-length") is not None:
        n = int(resp.header("content-length") or 0)
        if len(rest) < n:
            raise AssertionError(f"body cut: {len(rest)} of {n} bytes")
        resp.body = rest[:n]
    else:
        resp.body = rest
    return resp


def dechunk(data: bytes) -> bytes:
    out = []
    while True:
        line, sep, data = data.partition(b"\r\n")
        if not sep:
            raise AssertionError("chunked body cut (no size line)")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        if len(data) < size + 2:
            raise AssertionError("chunked body cut inside a chunk")
        out.append(data[:size])
        data = data[size + 2 :]


def http_request(
    address: tuple[str, int] | str,
    path: str = "/",
    method: str = "GET",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> HTTPResponse:
    """One request on a new connection, read until the server closes."""
    hdrs = {"Host": "localhost", "Connection": "close"}
    if body or method in ("POST", "PUT"):
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    with connect(address, timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        raw = read_all(sock)
    return parse_response(raw, head_only=(method == "HEAD"))


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(262144)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


# -- a client that reads responses by their framing --


class Cut(AssertionError):
    """The server closed the connection before the response was complete."""


class Conn:
    def __init__(
        self, address: tuple[str, int] | str, timeout: float = 10, rcvbuf: int | None = None
    ) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if rcvbuf:  # before connect, so that the TCP window is small from the start
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""
        self.received = 0  # bytes read from the socket so far

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def more(self, size: int = 262144) -> bool:
        try:
            data = self.sock.recv(size)
        except ConnectionResetError:
            data = b""
        self.received += len(data)
        self.buf += data
        return bool(data)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self.more():
                raise Cut(f"closed before {marker!r}: {self.buf[:300]!r}")
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self.more():
                raise Cut(f"closed after {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_eof(self) -> bytes:
        while self.more():
            pass
        out, self.buf = self.buf, b""
        return out

    def response(self, head_only: bool = False) -> HTTPResponse:
        head = self.read_until(b"\r\n\r\n")
        resp = parse_response(head, head_only=True)
        coding = (resp.header("Transfer-Encoding") or "").lower()
        if head_only or resp.status in (204, 304):
            body = b""
        elif coding == "chunked":
            body = self._chunked()
        elif resp.header("Content-Length") is not None:
            body = self.read_exact(int(resp.header("Content-Length") or 0))
        else:
            body = self.read_to_eof()
        resp.body = body
        return resp

    def _chunked(self) -> bytes:
        pieces = []
        for _ in range(1_000_000):
            size = int(self.read_until(b"\r\n").split(b";")[0].strip(), 16)
            if size == 0:
                while self.read_until(b"\r\n") != b"\r\n":  # trailer fields
                    pass
                return b"".join(pieces)
            pieces.append(self.read_exact(size))
            if self.read_exact(2) != b"\r\n":
                raise AssertionError("no CRLF after a chunk")
        raise AssertionError("too many chunks")

    def closed_by_server(self) -> bool:
        """True when the server closes with nothing more sent (bounded by the timeout)."""
        return self.read_to_eof() == b""


def request_bytes(
    method: str, target: str, *headers: str, body: bytes = b"", close: bool = True
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *headers]
    if close:
        lines.append("Connection: close")
    if body and not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(262144)
        except ConnectionResetError:
            data = b""
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    """Read until ``marker`` is in the bytes (the socket timeout bounds every wait)."""
    while marker not in data:
        more = sock.recv(65536)
        if not more:
            raise AssertionError(f"closed before {marker!r}: {data[:300]!r}")
        data += more
    return data


def poll_until(
    probe: Callable[[], T | None],
    what: str,
    proc: Proc | None = None,
    timeout: float = 20,
    interval: float = 0.05,
) -> T:
    """Call ``probe`` until it gives a true value (an OSError or AssertionError means "not
    yet"); fail naming ``what`` when time runs out or ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(
                f"{what}: process exited {proc.popen.returncode}:\n{proc.output()}"
            )
        try:
            result = probe()
        except (OSError, AssertionError) as exc:
            last = exc
        else:
            if result:
                return result
        time.sleep(interval)
    extra = f"\n{proc.output()}" if proc else ""
    raise AssertionError(f"{what}: not reached in {timeout} s (last: {last}){extra}")


def wait_http(
    address: tuple[str, int] | str, proc: Proc | None = None, path: str = "/", timeout: float = 20
) -> HTTPResponse:
    """Poll until an HTTP request succeeds (a TCP connect alone proves nothing)."""
    return poll_until(
        lambda: http_request(address, path, timeout=5), f"HTTP answer from {address}", proc, timeout
    )


@pytest.fixture
def short_tmp():
    path = tempfile.mkdtemp(prefix="chs-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs(tmp_path):
    """Start processes that are always stopped at teardown: ``procs.start(args, ...)``."""

    class Procs:
        def __init__(self) -> None:
            self.started: list[Proc] = []

        def start(self, args: list[str], **kw) -> Proc:
            kw.setdefault("log_dir", tmp_path)
            proc = Proc(args, **kw)
            self.started.append(proc)
            return proc

        def chaussette(self, *args: str, **kw) -> Proc:
            return self.start(chaussette_cmd(*args), **kw)

    holder = Procs()
    yield holder
    for proc in holder.started:
        if proc.popen.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc._log.close()
