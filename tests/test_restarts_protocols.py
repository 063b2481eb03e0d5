"""Restarts under load for chaussette's own protocols, behind their real front servers,
under real process managers.

- FastCGI (and SCGI): real nginx in front, passing to a socket the manager holds (a Circus
  socket; a Supervisor ``[fcgi-program]`` socket); two chaussette workers serve it. nginx
  has two servers on the one backend, loaded at once: ``keep`` (an upstream ``keepalive``
  pool and ``fastcgi_keep_conn on``: nginx reuses its connections to the workers) and
  ``close`` (a connection per request, nginx's default). The workers are replaced by a
  Circus ``restart`` (all stop, then all start: meanwhile new connections wait in the
  socket's queue), a Circus ``reload`` (new workers first, then the old ones stop) and a
  Supervisor rolling restart (one process at a time). On a cached keep-alive connection
  that a draining worker closes, nginx sends the request again on a new connection (only
  when no byte of the answer came): a drain closes idle connections at once, and never one
  with a request in it. Zero failed requests, every drain finished in time, and the new
  workers answer afterwards.
- Mongrel2: the real ``mongrel2`` in front, two handler processes under Circus, both
  connected to it, restarted and reloaded under load; see the Mongrel2 section below for
  what is guaranteed there.

Every test prints the load driver's figures (tests/load.py).

The managers are configured here rather than with tests/managers.py, which renders the
shipped examples for HTTP workers: these tests need FastCGI/SCGI workers (ready only
through nginx) and Circus watchers without a socket (Mongrel2 handlers connect out).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.apps.gateway_app import FIRST, SECOND
from tests.conftest import (
    ROOT,
    Conn,
    Proc,
    child_env,
    free_port,
    http_request,
    request_bytes,
    require_module,
    require_peer,
)
from tests.load import Load, Report
from tests.managers import circus_call
from tests.nginx import (
    GATEWAY_APP,
    HOST,
    Nginx,
    fastcgi_location,
    public_dir,
    scgi_location,
    server_block,
    upstream_block,
)

ENGINES = ("threads", "gevent", "eventlet")
GRACEFUL = 10  # chaussette's --graceful-timeout; the managers wait longer before SIGKILL
M2_APP = "tests.apps.m2_app:application"
BEFORE, AFTER = 40, 80  # answers of each load before the action, and after it


def is_pid(body: bytes) -> bool:
    return body.isdigit()


def chaussette_line(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "chaussette", *args])


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(check: Callable[[], object], what: str, proc: Proc, timeout: float = 30) -> None:
    """Until ``check()`` is true (bounded); fails if the manager ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.popen.poll() is not None:
            raise AssertionError(f"{what}: manager exited\n{proc.output()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not in {timeout} s\n{proc.output()[-4000:]}")
        time.sleep(0.05)


@pytest.fixture
def directory() -> Iterator[Path]:
    """A short directory nginx's workers can traverse (the managers' sockets live there)."""
    path = public_dir("chs-rp-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- managers ------------------------------------------------------------------------------


class Manager:
    """A process manager in the foreground with two workers ``web``, which log to
    ``worker_log`` (one file for all: the managers' own capture can drop the last lines of
    a process that stops)."""

    proc: Proc

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.worker_log = directory / "workers.log"
        self.seen: set[int] = set()  # every worker pid seen, killed at the end if alive

    def command(self, *args: str) -> str:
        return chaussette_line("--log-output", str(self.worker_log), *args)

    def pids(self) -> set[int]:
        raise NotImplementedError

    def running(self, count: int = 2) -> set[int]:
        """The workers' pids once there are ``count`` of them."""
        pids: set[int] = set()

        def enough() -> bool:
            nonlocal pids
            pids = self.pids()
            return len(pids) == count

        wait_for(enough, f"{count} workers running", self.proc)
        self.seen |= pids
        return pids

    def workers_output(self) -> str:
        return self.worker_log.read_text(errors="replace") if self.worker_log.exists() else ""

    def log(self) -> str:
        """For failure messages: the tail of the manager's and the workers' output."""
        return f"{self.proc.output()[-3000:]}\n--- workers:\n{self.workers_output()[-5000:]}"

    def quit(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """The manager stops its workers (they drain), then exits; leftovers are killed."""
        try:
            if self.proc.popen.poll() is None:
                with contextlib.suppress(AssertionError, OSError, xmlrpc.client.Error):
                    self.quit()
                self.proc.stop(timeout=GRACEFUL + 15)
        finally:
            self.proc.stop()
            for pid in self.seen:
                if is_alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def check_drains(self) -> None:
        """After ``stop()``: every worker that was told to stop finished all its requests
        within --graceful-timeout (an idle connection held no drain to its timeout)."""
        out = self.workers_output()
        stops, finished = out.count("SIGTERM: stopping"), out.count("all requests finished")
        assert stops >= 2 and finished == stops, f"{stops} drains, {finished} finished\n{out}"
        for bad in ("Traceback", "graceful timeout (", "WSGIWarning"):
            assert bad not in out, out


class Circus(Manager):
    """circusd with one watcher ``web`` of two processes, on a TCP socket ``web`` that
    circusd binds (``socket=True``), or without one (Mongrel2 handlers connect out)."""

    def __init__(
        self,
        directory: Path,
        args: Sequence[str],
        *,
        socket: bool,
        cwd: Path = ROOT,
        extra: str = "",
    ) -> None:
        super().__init__(directory)
        self.endpoint = f"ipc://{directory}/ctl"
        self.port = free_port() if socket else 0
        command = self.command(*args)
        if socket:
            command = self.command("--fd", "$(circus.sockets.web)", *args)
        sock = f"[socket:web]\nhost = {HOST}\nport = {self.port}\n" if socket else ""
        ini = directory / "circus.ini"
        ini.write_text(
            f"""[circus]
endpoint = {self.endpoint}
pubsub_endpoint = ipc://{directory}/pub
multicast_endpoint =
loglevel = info
logoutput = -
{sock}
[watcher:web]
cmd = {command}
use_sockets = {socket}
numprocesses = 2
working_dir = {cwd}
copy_env = True
stop_signal = TERM
graceful_timeout = {GRACEFUL + 10}
{extra}"""
        )
        argv = [sys.executable, "-m", "circus.circusd", str(ini)]
        self.proc = Proc(argv, log_dir=directory, env=child_env())

    def call(self, command: str, **props: object) -> dict[str, Any]:
        return circus_call(self.endpoint, self.proc, command, **props)

    def pids(self) -> set[int]:
        return {int(p) for p in self.call("list", name="web")["pids"]}

    def ctl(self, *args: str) -> None:
        base = [sys.executable, "-m", "circus.circusctl", "--endpoint", self.endpoint]
        done = subprocess.run(
            [*base, "--timeout", "60", *args],
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0 and done.stdout.strip() == "ok", (
            f"circusctl {args}: {done.stdout}{done.stderr}\n{self.log()}"
        )

    def restart(self) -> None:
        self.ctl("restart", "web", "--waiting")

    def reload(self) -> None:
        self.ctl("reload", "web", "--waiting")

    def quit(self) -> None:
        self.ctl("quit", "--waiting")


class Supervisor(Manager):
    """supervisord with ``[fcgi-program:web]`` on a TCP socket it binds, two processes
    ``web:web_0`` and ``web:web_1`` serving it as fd 0; or, with ``socket=False``, a
    ``[program:web]`` of two processes without one (Mongrel2 handlers connect out)."""

    def __init__(
        self,
        directory: Path,
        args: Sequence[str],
        *,
        socket: bool = True,
        cwd: Path = ROOT,
        extra: str = "",
    ) -> None:
        super().__init__(directory)
        self.port = free_port() if socket else 0
        self.conf = directory / "supervisor.conf"
        self.sock = directory / "sv.sock"
        program = (
            f"[fcgi-program:web]\nsocket = tcp://{HOST}:{self.port}\n"
            f"command = {self.command('--fd', '0', *args)}\n"
            if socket
            else f"[program:web]\ncommand = {self.command(*args)}\n"
        )
        self.conf.write_text(
            f"""[supervisord]
logfile = {directory}/supervisord.log
pidfile = {directory}/supervisord.pid
[unix_http_server]
file = {self.sock}
chmod = 0700
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl = unix://{self.sock}
{program}directory = {cwd}
numprocs = 2
process_name = %(program_name)s_%(process_num)s
stopsignal = TERM
stopwaitsecs = {GRACEFUL + 10}
startsecs = 1
autorestart = true
redirect_stderr = true
stdout_logfile = {directory}/%(program_name)s_%(process_num)s.out
{extra}"""
        )
        argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)]
        self.proc = Proc(argv, log_dir=directory, env=child_env())

    @contextlib.contextmanager
    def rpc(self) -> Iterator[Any]:
        """A new XML-RPC proxy on supervisord's unix socket, closed after use."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.sock}")
        try:
            yield xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        finally:
            transport.close()

    def pids(self) -> set[int]:
        try:
            with self.rpc() as proxy:
                infos = proxy.supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error):
            return set()
        infos = [info for info in infos if info["group"] == "web"]
        if {info["name"] for info in infos} != {"web_0", "web_1"}:
            return set()
        return {info["pid"] for info in infos if info["statename"] == "RUNNING"}

    def rolling_restart(self, serving: Callable[[int], None]) -> None:
        """One process at a time (``supervisorctl restart web:web_N`` does the same), the
        new one serving (``serving(pid)``) before the next is stopped. ``restart web:*``
        would close supervisord's socket while no process uses it."""
        for name in ("web:web_0", "web:web_1"):
            before = self.pids()
            with self.rpc() as proxy:
                assert proxy.supervisor.stopProcess(name, True)
                assert proxy.supervisor.startProcess(name, True)
            new = self.running() - before
            assert len(new) == 1, f"{name}: running {self.pids()}, before {before}"
            serving(new.pop())

    def quit(self) -> None:
        with self.rpc() as proxy:
            proxy.supervisor.shutdown()

    def log(self) -> str:
        own = (self.directory / "supervisord.log").read_text(errors="replace")
        return f"{own[-3000:]}\n--- workers:\n{self.workers_output()[-5000:]}"


# -- the load ------------------------------------------------------------------------------


def load_while(loads: dict[str, Load], action: Callable[[], object]) -> dict[str, Report]:
    """Every load at once: ``BEFORE`` answers each, ``action()``, ``AFTER`` more each."""
    for load in loads.values():
        load.start()
    try:
        for load in loads.values():
            load.wait_answers(BEFORE)
        action()
        for load in loads.values():
            load.wait_answers_after(AFTER)
    finally:
        reports = {name: load.stop() for name, load in loads.items()}
    for name, report in reports.items():
        print(f"[{name}] {report.summary()}")
    return reports


def answered_by(report: Report) -> set[int]:
    return {int(body) for body in report.bodies}


def check_replaced(report: Report, new: set[int], old: set[int], logs: str) -> None:
    """New workers answered, and they alone answered the last request of each client
    (except a client whose request was lost: its last answer is older)."""
    assert not new & old, f"old workers kept: {new & old}"
    assert answered_by(report) & new, f"no new worker answered: {report.summary()}"
    waited = {f.client for f in report.failures}
    latest = {int(body) for n, body in report.last_bodies.items() if n not in waited}
    assert latest <= new, f"old workers {latest & old} answered last\n{logs}"


# -- FastCGI and SCGI behind nginx ---------------------------------------------------------


class Front:
    """nginx with a server per way of passing to the manager's socket: ``keep`` (FastCGI
    only: keepalive pool, keep_conn on) and ``close`` (a connection per request)."""

    def __init__(self, directory: Path, protocol: str, backend_port: int) -> None:
        program = require_peer("nginx", "nginx")
        address = f"{HOST}:{backend_port}"
        body = upstream_block("keep", address, keepalive=8) + upstream_block("close", address)
        if protocol == "fastcgi":
            servers = {
                "keep": fastcgi_location("/", "keep", keep_conn=True),
                "close": fastcgi_location("/", "close", keep_conn=False),
            }
        else:  # SCGI has one request per connection: nginx pools nothing
            servers = {"close": scgi_location("/", "close")}
        self.ports = {name: free_port() for name in servers}
        body += "".join(server_block(self.ports[n], locs) for n, locs in servers.items())
        self.nginx = Nginx(program, directory / "nginx", body, list(self.ports.values()))
        self.nginx.start()

    def loads(self) -> dict[str, Load]:
        return {
            name: Load((HOST, port), "/pid", clients=4, expect=is_pid, timeout=20)
            for name, port in self.ports.items()
        }

    def pid(self, port: int) -> int | None:
        with contextlib.suppress(OSError, AssertionError, ValueError):
            resp = http_request((HOST, port), "/pid", timeout=5)
            if resp.status == 200:
                return int(resp.body)
        return None

    def wait_through(self, proc: Proc) -> None:
        """Every server answers through the workers (nginx says 502 until they serve)."""
        wait_for(lambda: all(self.pid(p) for p in self.ports.values()), "answers", proc)

    def serving(self, pid: int, proc: Proc) -> None:
        """Until worker ``pid`` has answered through nginx (bounded)."""
        port = next(iter(self.ports.values()))
        wait_for(lambda: self.pid(port) == pid, f"worker {pid} answering", proc)

    def stop(self) -> None:
        self.nginx.stop()


def run_restarts(
    manager: Manager, front: Front, actions: Sequence[tuple[str, Callable[[], object]]]
) -> None:
    """Each action under load through nginx: zero failures, new workers answer after,
    and every drain finished within its timeout."""
    try:
        front.wait_through(manager.proc)
        old = manager.running()
        for what, action in actions:
            print(f"--- {what}")
            reports = load_while(front.loads(), action)
            new = manager.running()
            logs = manager.log() + "\n--- nginx:\n" + front.nginx.error_log()[-3000:]
            failed = [f"[{name}] {r.summary()}" for name, r in reports.items() if r.failed]
            assert not failed, "\n".join(failed) + "\n" + logs
            for report in reports.values():
                check_replaced(report, new, old, logs)
            old = new
    finally:
        front.stop()
        manager.stop()
    manager.check_drains()


def protocol_args(protocol: str, engine: str) -> list[str]:
    args = ["--protocol", protocol, "--backend", engine]
    return [*args, "--graceful-timeout", str(GRACEFUL), GATEWAY_APP]


def with_front(manager: Manager, directory: Path, protocol: str, port: int) -> Front:
    try:
        return Front(directory, protocol, port)
    except BaseException:
        manager.stop()
        raise


@pytest.mark.parametrize("engine", ENGINES)
def test_fastcgi_circus_restart_and_reload(engine, directory):
    require_peer("nginx", "nginx")
    circus = Circus(directory, protocol_args("fastcgi", engine), socket=True)
    front = with_front(circus, directory, "fastcgi", circus.port)
    actions = [("circus restart", circus.restart), ("circus reload", circus.reload)]
    run_restarts(circus, front, actions)


@pytest.mark.parametrize("engine", ENGINES)
def test_fastcgi_supervisor_rolling_restart(engine, directory):
    require_peer("nginx", "nginx")
    sup = Supervisor(directory, protocol_args("fastcgi", engine))
    front = with_front(sup, directory, "fastcgi", sup.port)

    def rolling() -> None:
        sup.rolling_restart(lambda pid: front.serving(pid, sup.proc))

    run_restarts(sup, front, [("supervisor rolling restart", rolling)])


def test_scgi_circus_reload_and_supervisor_rolling_restart(directory):
    require_peer("nginx", "nginx")
    (directory / "c").mkdir()
    circus = Circus(directory / "c", protocol_args("scgi", "threads"), socket=True)
    front = with_front(circus, directory / "c", "scgi", circus.port)
    run_restarts(circus, front, [("circus reload", circus.reload)])

    (directory / "s").mkdir()
    sup = Supervisor(directory / "s", protocol_args("scgi", "threads"))
    front = with_front(sup, directory / "s", "scgi", sup.port)

    def rolling() -> None:
        sup.rolling_restart(lambda pid: front.serving(pid, sup.proc))

    run_restarts(sup, front, [("supervisor rolling restart", rolling)])


# -- Mongrel2 ------------------------------------------------------------------------------
#
# Handlers connected straight to Mongrel2 (its PUSH socket) cannot leave without a risk:
# a request Mongrel2 is handing to a handler at the very moment the handler leaves is
# dropped inside Mongrel2 (PUSH has no acknowledgement; chaussette/drivers/mongrel2.py,
# PullDrain, serves everything else). So restarts that lose nothing go through
# chaussette-dispatcher in credit mode, which the managers run beside the handlers, as
# docs/mongrel2.rst tells operators to: a handler gets a request only after it asked for
# one, and leaves with a goodbye the dispatcher answers. Those restarts must lose nothing.
# The direct way is tested for what it does guarantee, and its losses are printed.


@pytest.fixture
def m2(directory):
    from tests.mongrel2 import start_mongrel2

    require_module("zmq", "pip install 'chaussette[mongrel2]'")
    require_peer("mongrel2", "mongrel2-core")
    workdir = directory / "m2"
    workdir.mkdir()
    server = start_mongrel2(workdir)
    yield server
    server.stop()


def handler_args(m2: Any, engine: str, *extra: str) -> list[str]:
    args = ["--protocol", "mongrel2", "--backend", engine, "--zeromq", m2.tnet]
    return [*args, "--upload-dir", "tmp", "--graceful-timeout", str(GRACEFUL), *extra, M2_APP]


def served(log: str) -> int:
    """Requests of the load a handler answered, by the access log lines in ``log``."""
    return log.count('"GET /app/pid HTTP/1.1" 200 ')


class Credit:
    """chaussette-dispatcher in credit mode between Mongrel2 and the handlers, as a
    program of the manager's own."""

    def __init__(self, m2: Any, directory: Path) -> None:
        self.endpoint = f"tcp://{HOST}:{free_port()}"
        self.log = directory / "dispatcher.log"
        argv = [sys.executable, "-m", "chaussette.devices.dispatcher", "--zeromq", m2.tnet]
        self.line = shlex.join([*argv, "--credit", self.endpoint])

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def circus(self) -> str:
        return (
            f"[watcher:dispatcher]\ncmd = {self.line}\nnumprocesses = 1\ncopy_env = True\n"
            f"stderr_stream.class = FileStream\nstderr_stream.filename = {self.log}\n"
        )

    def supervisor(self) -> str:
        return (
            f"[program:dispatcher]\ncommand = {self.line}\nredirect_stderr = true\n"
            f"stdout_logfile = {self.log}\nstopsignal = TERM\n"
        )

    def ready(self, manager: Manager, pid: int) -> None:
        """Until handler ``pid`` has asked the dispatcher for requests (bounded)."""
        mark = f"[{pid}] [INFO] ready for "
        wait_for(lambda: mark in manager.workers_output(), f"handler {pid} ready", manager.proc)

    def check(self) -> None:
        """After the manager stopped: the dispatcher dropped nothing, stopped cleanly."""
        out = self.output()
        assert "Traceback" not in out and "one dropped" not in out, out
        assert " 0 dropped" in out, out


def run_m2_restarts(
    manager: Manager,
    m2: Any,
    credit: Credit,
    actions: Sequence[tuple[str, Callable[[], object]]],
) -> None:
    """Each action under load through Mongrel2: zero failures, every answer logged by a
    handler, the new handlers answer after, every drain finished within its timeout."""
    from tests.mongrel2 import wait_handler

    try:
        old = manager.running()
        for pid in old:
            credit.ready(manager, pid)
        wait_handler(m2, manager.proc)
        for what, action in actions:
            print(f"--- {what}")
            before = served(manager.workers_output())
            load = Load(m2.address, "/app/pid", clients=4, expect=is_pid, timeout=5)
            report = load_while({"mongrel2": load}, action)["mongrel2"]
            new = manager.running()
            logs = f"{manager.log()}\n--- dispatcher:\n{credit.output()[-3000:]}"
            assert report.failed == 0, f"{report.summary()}\n{logs}"
            wait_for(
                lambda before=before, ok=report.ok: served(manager.workers_output()) - before >= ok,
                "the handlers' access log",
                manager.proc,
                timeout=10,
            )
            check_replaced(report, new, old, logs)
            old = new
    finally:
        manager.stop()
    manager.check_drains()
    credit.check()


@pytest.mark.parametrize("engine", ENGINES)
def test_mongrel2_circus_restart_and_reload(engine, m2, directory):
    credit = Credit(m2, directory)
    args = handler_args(m2, engine, "--m2-dispatcher", credit.endpoint, "--access-log", "-")
    circus = Circus(directory, args, socket=False, cwd=m2.workdir, extra=credit.circus())
    actions = [("circus restart", circus.restart), ("circus reload", circus.reload)]
    run_m2_restarts(circus, m2, credit, actions)


@pytest.mark.parametrize("engine", ENGINES)
def test_mongrel2_supervisor_rolling_restart(engine, m2, directory):
    credit = Credit(m2, directory)
    args = handler_args(m2, engine, "--m2-dispatcher", credit.endpoint, "--access-log", "-")
    sup = Supervisor(directory, args, socket=False, cwd=m2.workdir, extra=credit.supervisor())

    def rolling() -> None:
        sup.rolling_restart(lambda pid: credit.ready(sup, pid))

    def all_at_once() -> None:  # supervisorctl restart web:* (no socket to close here)
        with sup.rpc() as proxy:
            assert all(r["status"] == 80 for r in proxy.supervisor.stopProcessGroup("web"))
            assert all(r["status"] == 80 for r in proxy.supervisor.startProcessGroup("web"))

    actions = [("supervisor rolling restart", rolling), ("supervisor restart web:*", all_at_once)]
    run_m2_restarts(sup, m2, credit, actions)


def test_mongrel2_direct_circus_reload(m2, directory):
    """Handlers connected straight to Mongrel2, reloaded under load: no request fails but
    by waiting for an answer that never comes (one Mongrel2 dropped as its handler left),
    and every answer a handler gave reached its client. The losses are printed."""
    from tests.mongrel2 import wait_handler

    args = handler_args(m2, "threads", "--access-log", "-")
    circus = Circus(directory, args, socket=False, cwd=m2.workdir)
    try:
        old = circus.running()
        wait_handler(m2, circus.proc)
        before = served(circus.workers_output())
        load = Load(m2.address, "/app/pid", clients=4, expect=is_pid, timeout=5)
        report = load_while({"mongrel2": load}, circus.reload)["mongrel2"]
        new = circus.running()
        logs = circus.log() + "\n--- mongrel2:\n" + m2.log()[-2000:]
        others = [f for f in report.failures if "TimeoutError" not in f.what]
        assert not others, f"{report.summary()}\n{logs}"
        count = 0

        def logged() -> bool:
            nonlocal count
            count = served(circus.workers_output()) - before
            return count >= report.ok

        wait_for(logged, "the handlers' access log", circus.proc, timeout=10)
        assert count == report.ok, f"handlers answered {count}, clients got {report.ok}"
        print(f"lost {report.failed}: handed by Mongrel2 to a handler as it was leaving")
        check_replaced(report, new, old, logs)
    finally:
        circus.stop()
    circus.check_drains()


@pytest.mark.parametrize("engine", ENGINES)
def test_mongrel2_drain_serves_what_mongrel2_queued(engine, m2, procs):
    """A handler drains while Mongrel2 has many requests for it, more than its own queue
    holds (RCV_HWM, 64): the rest wait in the socket buffers and in Mongrel2's own queue,
    which a handler that left at once would make Mongrel2 drop. Its one task
    (--threads/--spawn 1) is held on a gate until the drain has begun, so they pile up;
    all are served."""
    from tests.mongrel2 import wait_handler

    size = "--threads" if engine == "threads" else "--spawn"
    proc = procs.chaussette(*handler_args(m2, engine, size, "1"), cwd=m2.workdir)
    wait_handler(m2, proc)
    gate = m2.workdir / "gate"
    count = 150
    conns: list[Conn] = []
    answered = 0
    try:
        for _ in range(count):
            conns.append(Conn(m2.address, timeout=20))
            conns[-1].send(request_bytes("GET", f"/app/gate?path={gate}"))
        conns[0].read_until(b"first piece")  # the first holds the only task
        # settle: Mongrel2 has pushed the others (it parses and pushes each at once), so
        # none comes while the handler leaves
        time.sleep(0.5)
        proc.send(signal.SIGTERM)
        proc.wait_for_output("SIGTERM")
        gate.write_text("open")
        answered = 0
        for conn in conns[1:]:
            body = conn.response().body  # a request lost would time out here
            assert body == FIRST + SECOND, body
            answered += 1
    except (OSError, AssertionError) as exc:
        raise AssertionError(
            f"{answered} of {count - 1} answered, then {exc!r}\n{proc.output()}"
        ) from None
    finally:
        for conn in conns:
            conn.sock.close()
    assert proc.wait(20) == 0, proc.output()
    out = proc.output()
    assert "leaving Mongrel2" in out and "Traceback" not in out, out
