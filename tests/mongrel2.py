"""A real Mongrel2 (Debian ``mongrel2-core``) for the tests, in a temp dir of its own.

``start_mongrel2(workdir)`` writes ``mongrel2.conf``, loads it with ``m2sh load`` into
``config.sqlite`` (checked with ``m2sh servers``: ``m2sh load`` exits 0 even on errors),
and runs ``mongrel2 config.sqlite UUID`` in the foreground from the work dir (as root it
chroots there). Routes, on one host ``localhost``:

- ``/app``  -> a handler with ``protocol='tnetstring'`` (``Mongrel2.tnet``: its --zeromq);
- ``/json`` -> a handler with ``protocol='json'`` (``Mongrel2.json``);
- ``/static/`` -> Mongrel2's own Dir handler over ``static/`` (``index.html``).

Uploads over ``limits.content_length`` (Mongrel2's default, 20480 bytes) are spooled to
``tmp/upload.XXXXXX``. Ready: the Dir route answers over HTTP. A handler is ready only when
an HTTP round trip through it succeeds (``wait_handler``): Mongrel2 binds its ZeroMQ
sockets after the web port, and holds requests while no handler is connected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import Proc, child_env, http_request, require_peer

SERVER_UUID = "f400bf85-4538-4f7a-8908-67e313d515c2"
TNET_IDENT = "34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
JSON_IDENT = "8b1d2ef0-7c4e-4b1a-9d3c-2f6e5a4b3c21"
INDEX = b"static index\n"

CONF = """\
tnet = Handler(send_spec='tcp://127.0.0.1:{tnet}', send_ident='{tnet_ident}',
               recv_spec='tcp://127.0.0.1:{tnet_recv}', recv_ident='', protocol='tnetstring')
json = Handler(send_spec='tcp://127.0.0.1:{json}', send_ident='{json_ident}',
               recv_spec='tcp://127.0.0.1:{json_recv}', recv_ident='', protocol='json')
files = Dir(base='static/', index_file='index.html', default_ctype='text/plain')
main = Server(
    uuid="{uuid}",
    access_log="/logs/access.log",
    error_log="/logs/error.log",
    chroot="./",
    default_host="localhost",
    name="test",
    pid_file="/run/mongrel2.pid",
    port={port},
    bind_addr="127.0.0.1",
    hosts=[Host(name="localhost", routes={{'/app': tnet, '/json': json, '/static/': files}})]
)
settings = {{"server.daemonize": 0, "upload.temp_store": "tmp/upload.XXXXXX"}}
servers = [main]
"""


def port_pair() -> int:
    """A free TCP port P whose P - 1 is free too (a send_spec and its recv_spec)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 1100:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port - 1))
            except OSError:
                continue
        return port
    raise AssertionError("no free pair of ports")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mongrel2:
    workdir: Path
    port: int
    tnet_port: int
    json_port: int
    proc: Proc

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def tnet(self) -> str:
        """--zeromq for the tnetstring handler (its recv port is the next one down)."""
        return f"tcp://127.0.0.1:{self.tnet_port}"

    @property
    def json(self) -> str:
        return f"tcp://127.0.0.1:{self.json_port},tcp://127.0.0.1:{self.json_port - 1}"

    @property
    def config(self) -> Path:
        return self.workdir / "config.sqlite"

    @property
    def uploads(self) -> Path:
        return self.workdir / "tmp"

    def log(self) -> str:
        path = self.workdir / "logs" / "error.log"
        return self.proc.output() + (path.read_text(errors="replace") if path.exists() else "")

    def stop(self) -> None:
        if self.proc.popen.poll() is None:
            self.proc.send(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.stop()


def m2sh_load(workdir: Path, text: str) -> None:
    m2sh = require_peer("m2sh", "mongrel2-core")
    (workdir / "mongrel2.conf").write_text(text)
    env = child_env({"LOGNAME": os.environ.get("LOGNAME", "chaussette")})
    run = {"cwd": workdir, "env": env, "capture_output": True, "timeout": 30}
    subprocess.run(
        [m2sh, "load", "-config", "mongrel2.conf", "-db", "config.sqlite"], check=True, **run
    )
    listed = subprocess.run([m2sh, "servers", "-db", "config.sqlite"], check=True, **run)
    if SERVER_UUID.encode() not in listed.stdout:
        raise AssertionError(f"m2sh load failed: {listed.stdout!r} {listed.stderr!r}")


def start_mongrel2(workdir: Path) -> Mongrel2:
    program = require_peer("mongrel2", "mongrel2-core")
    for sub in ("run", "logs", "tmp", "static"):
        (workdir / sub).mkdir(exist_ok=True)
    (workdir / "static" / "index.html").write_bytes(INDEX)
    port, tnet, json = free_tcp_port(), port_pair(), port_pair()
    m2sh_load(
        workdir,
        CONF.format(
            tnet=tnet,
            tnet_recv=tnet - 1,
            json=json,
            json_recv=json - 1,
            tnet_ident=TNET_IDENT,
            json_ident=JSON_IDENT,
            uuid=SERVER_UUID,
            port=port,
        ),
    )
    with contextlib.suppress(FileNotFoundError):
        (workdir / "run" / "mongrel2.pid").unlink()
    proc = Proc([program, "config.sqlite", SERVER_UUID], cwd=workdir, log_dir=workdir)
    m2 = Mongrel2(workdir, port, tnet, json, proc)
    deadline = time.monotonic() + 20
    while True:
        if proc.popen.poll() is not None:
            raise AssertionError(f"mongrel2 exited {proc.popen.returncode}:\n{m2.log()}")
        try:
            if http_request(m2.address, "/static/", timeout=2).body == INDEX:
                return m2
        except (OSError, AssertionError):
            pass
        if time.monotonic() > deadline:
            m2.stop()
            raise AssertionError(f"mongrel2 did not answer on {port}:\n{m2.log()}")
        time.sleep(0.05)


def wait_handler(m2: Mongrel2, proc: Proc, path: str = "/app/", timeout: float = 20) -> None:
    """An HTTP round trip through a handler, retried within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"handler exited {proc.popen.returncode}:\n{proc.output()}")
        try:
            if http_request(m2.address, path, timeout=2).status == 200:
                return
        except (OSError, AssertionError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"no answer through {path}: {last}\n{proc.output()}\n{m2.log()}")
