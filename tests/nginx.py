"""Real nginx in front of a real chaussette, for the FastCGI and SCGI tests.

nginx runs in the foreground from a temporary prefix, where everything it writes stays:
its pid file, error log and all five ``*_temp_path`` directories (as root, nginx would
otherwise create files under /var/lib/nginx and /run). The prefix is made readable by
others because, as root, nginx's workers run as ``nobody``: they must reach the request
body temp files and, over a unix socket, the backend's socket (which chaussette creates
with ``--socket-mode 666``).

Stopping order matters: nginx first (SIGQUIT, its graceful stop), then the backend, since
nginx holds idle keep-alive connections to the backend.

``GatewayStack`` is what the tests use: one chaussette process and one nginx with as many
``server`` blocks (ports) as the test wants, started and stopped together.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import Proc, chaussette_cmd, child_env, free_port, http_request

HOST = "127.0.0.1"
GATEWAY_APP = "tests.apps.gateway_app:application"
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
FASTCGI_PARAMS = "/etc/nginx/fastcgi_params"
SCGI_PARAMS = "/etc/nginx/scgi_params"


def public_dir(prefix: str = "chs-ngx-") -> Path:
    """A short directory under /tmp that nginx's ``nobody`` workers can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


# -- configuration -------------------------------------------------------------------------


def nginx_conf(prefix: Path, http_body: str) -> str:
    """A whole nginx.conf that keeps every file nginx writes inside ``prefix``."""
    temps = "\n".join(f"    {kind}_temp_path {prefix}/tmp/{kind};" for kind in TEMP_KINDS)
    return f"""
worker_processes 1;
pid {prefix}/logs/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temps}
    client_max_body_size 64m;
    keepalive_requests 100000;
{http_body}
}}
"""


def server_block(port: int, locations: str) -> str:
    """A ``server`` on 127.0.0.1:port with the ready probe and ``locations``."""
    return f"""
    server {{
        listen {HOST}:{port};
        location = /ready {{ return 200 "ready\\n"; }}
{locations}
    }}
"""


def upstream_block(name: str, address: str, keepalive: int = 0) -> str:
    """``address`` is ``127.0.0.1:PORT`` or ``unix:/path``."""
    keep = f" keepalive {keepalive};" if keepalive else ""
    return f"    upstream {name} {{ server {address};{keep} }}\n"


def fastcgi_location(
    path: str,
    upstream: str,
    *,
    keep_conn: bool,
    buffering: bool = True,
    strip: str = "",
    stock_params: bool = False,
) -> str:
    """A location passing to ``upstream`` over FastCGI.

    By default SCRIPT_NAME is set empty and PATH_INFO to the URI, after the stock params
    (which set SCRIPT_NAME a first time: nginx sends both, the last must win). With
    ``stock_params`` only Debian's params are sent: no PATH_INFO at all. ``strip`` is a
    prefix removed from the URI before it is passed on.
    """
    lines = [f"include {FASTCGI_PARAMS};"]
    if strip:
        lines.insert(0, f"rewrite ^{strip}(/.*)$ $1 break;")
    if not stock_params:
        lines += ['fastcgi_param SCRIPT_NAME "";', "fastcgi_param PATH_INFO $uri;"]
    lines.append(f"fastcgi_keep_conn {'on' if keep_conn else 'off'};")
    if not buffering:
        lines.append("fastcgi_buffering off;")
    lines.append(f"fastcgi_pass {upstream};")
    body = "\n".join(f"            {line}" for line in lines)
    return f"        location {path} {{\n{body}\n        }}\n"


def scgi_location(
    path: str,
    upstream: str,
    *,
    buffering: bool = True,
    strip: str = "",
    stock_params: bool = False,
) -> str:
    """A location passing to ``upstream`` over SCGI (Debian's scgi_params have neither
    SCRIPT_NAME nor PATH_INFO; ``stock_params`` sends only those)."""
    lines = [f"include {SCGI_PARAMS};"]
    if strip:
        lines.insert(0, f"rewrite ^{strip}(/.*)$ $1 break;")
    if not stock_params:
        lines += ['scgi_param SCRIPT_NAME "";', "scgi_param PATH_INFO $uri;"]
    if not buffering:
        lines.append("scgi_buffering off;")
    lines.append(f"scgi_pass {upstream};")
    body = "\n".join(f"            {line}" for line in lines)
    return f"        location {path} {{\n{body}\n        }}\n"


# -- processes -----------------------------------------------------------------------------


class Nginx:
    """nginx in the foreground from ``prefix``; ``$!`` (our Popen) is the master."""

    def __init__(self, program: str, prefix: Path, http_body: str, ports: Sequence[int]) -> None:
        self.program, self.prefix, self.ports = program, prefix, list(ports)
        for sub in ("conf", "logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
            (prefix / sub).chmod(0o755)
        (prefix / "conf" / "nginx.conf").write_text(nginx_conf(prefix, http_body))
        self.proc: Proc | None = None

    def start(self, timeout: float = 15) -> None:
        argv = [self.program, "-p", f"{self.prefix}/", "-c", "conf/nginx.conf"]
        argv += ["-g", "daemon off;"]
        self.proc = Proc(argv, cwd=self.prefix, log_dir=self.prefix / "logs")
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while True:
                if self.proc.popen.poll() is not None:
                    raise AssertionError(f"nginx exited: {self.proc.output()}{self.error_log()}")
                with contextlib.suppress(OSError, AssertionError):
                    if http_request((HOST, port), "/ready", timeout=2).status == 200:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"nginx not ready on {port}: {self.error_log()}")
                time.sleep(0.02)

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGQUIT (graceful), then SIGKILL to the group if it lingers."""
        if self.proc is not None:
            self.proc.stop(signal.SIGQUIT, timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # a worker left behind


class Backend:
    """chaussette serving the gateway app over ``protocol`` on a TCP port or a unix socket
    (mode 666, so that nginx's ``nobody`` workers can connect)."""

    def __init__(
        self,
        protocol: str,
        engine: str,
        transport: str,
        directory: Path,
        *extra: str,
        app: str = GATEWAY_APP,
    ) -> None:
        self.address: tuple[str, int] | str
        if transport == "unix":
            self.address = path = str(directory / "app.sock")
            self.upstream = f"unix:{path}"
            listen = ["--host", f"unix:{path}", "--socket-mode", "666"]
        else:
            port = free_port()
            self.address = (HOST, port)
            self.upstream = f"{HOST}:{port}"
            listen = ["--host", HOST, "--port", str(port)]
        args = ["--protocol", protocol, "--backend", engine, *listen, *extra, app]
        self.proc = Proc(chaussette_cmd(*args), log_dir=directory, env=child_env())

    def stop(self) -> int:
        return self.proc.stop(signal.SIGTERM, timeout=20)


def wait_through(port: int, backend: Backend, nginx: Nginx, timeout: float = 20) -> None:
    """Poll ``GET /`` through nginx until the backend answers 200 (502 until it listens)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if backend.proc.popen.poll() is not None:
            raise AssertionError(
                f"backend exited {backend.proc.popen.returncode}:\n{logs(backend, nginx)}"
            )
        try:
            resp = http_request((HOST, port), "/", timeout=5)
        except (OSError, AssertionError) as exc:
            last = str(exc)
        else:
            if resp.status == 200:
                return
            last = f"{resp.status} {resp.body[:100]!r}"
        time.sleep(0.03)
    raise AssertionError(f"no 200 through nginx: {last}\n{logs(backend, nginx)}")


def logs(backend: Backend, nginx: Nginx | None = None) -> str:
    text = f"--- backend output:\n{backend.proc.output()[-4000:]}"
    if nginx is not None:
        text += f"\n--- nginx error.log:\n{nginx.error_log()[-4000:]}"
    return text


class GatewayStack:
    """One backend and one nginx in front of it, started and stopped together.

    ``servers`` maps a name to that server's ``location`` blocks, which pass to one of two
    upstreams, both the backend: ``keep`` (``keepalive 8``) and ``close`` (none). Each
    server gets a port of its own, in ``ports``.
    """

    def __init__(
        self,
        nginx_program: str,
        protocol: str,
        engine: str,
        transport: str,
        servers: dict[str, str],
        *extra: str,
    ) -> None:
        self.directory = public_dir()
        self.ports = {name: free_port() for name in servers}
        self.backend = Backend(protocol, engine, transport, self.directory, *extra)
        up = self.backend.upstream
        body = upstream_block("keep", up, keepalive=8) + upstream_block("close", up)
        body += "".join(server_block(self.ports[n], locs) for n, locs in servers.items())
        ports = list(self.ports.values())
        self.nginx = Nginx(nginx_program, self.directory / "nginx", body, ports)
        try:
            self.nginx.start()
            wait_through(next(iter(self.ports.values())), self.backend, self.nginx)
        except BaseException:
            self.close()
            raise

    def address(self, server: str) -> tuple[str, int]:
        return (HOST, self.ports[server])

    def logs(self) -> str:
        return logs(self.backend, self.nginx)

    def close(self) -> int:
        """Stop nginx, then the backend; the backend's exit code."""
        try:
            self.nginx.stop()
        finally:
            code = self.backend.stop()
            shutil.rmtree(self.directory, ignore_errors=True)
        return code
