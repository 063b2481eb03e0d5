"""Real Circus and real Supervisor around chaussette, rendered from the SHIPPED examples.

examples/circus.ini and examples/supervisor.conf are read as they are; only the values an
operator is told to adapt are substituted (port, directories, the chaussette command, the
app). A test may add chaussette options (``--backend ...``), pick the drain time and the
manager's stop timeout, or leave out Circus' unix-socket watcher; nothing else changes.

Each manager is started in its own session; every worker pid it reports is recorded (in
``seen`` and in the set given as ``workers``), because the managers put their workers in
sessions or process groups of their own and a SIGKILLed manager leaves them running: the
``workers`` fixture kills whatever is still alive at teardown.

Restarts under load (tests/test_restarts_managers.py):

- ``Circus.restart(watcher)`` / ``Circus.reload(watcher)``: ``circusctl restart|reload
  WATCHER --waiting`` (asynchronous without ``--waiting``), then the new processes.
- ``Supervisor.rolling_restart()``: ``supervisorctl restart web:web_0``, wait until it is
  RUNNING under a new pid and that pid answers ``/pid``, then the same for ``web:web_1``.
  ``restart web:*`` would close supervisord's socket while no process uses it.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, ROUTES_APP, Proc, free_port, http_request, poll_until

EXAMPLES = ROOT / "examples"

# The example's drain time and manager stop timeout (seconds), as shipped.
EXAMPLE_GRACEFUL = (25, 30)


# -- rendering the shipped examples --


def chaussette_command() -> str:
    """The chaussette console script of this environment, else ``python -m chaussette``."""
    script = Path(sys.executable).parent / "chaussette"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m chaussette"


def render(example: str, dest: Path, substitutions: list[tuple[str, str]]) -> Path:
    """Copy an example with the operator's values substituted, in this order."""
    text = (EXAMPLES / example).read_text()
    for old, new in substitutions:
        assert old in text, f"examples/{example} no longer contains {old!r}"
        text = text.replace(old, new)
    for line in text.splitlines():
        # Every value an operator must adapt is in the list above: none is left over.
        if not line.lstrip().startswith(("#", ";")):
            assert "myapp" not in line, f"examples/{example}: unsubstituted {line!r}"
    dest.write_text(text)
    return dest


def read_ini(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(inline_comment_prefixes=None)
    parser.read(path)
    return parser


def drop_sections(path: Path, *names: str) -> None:
    """Remove whole ``[sections]`` from a rendered ini file, comments and all."""
    kept: list[str] = []
    skipping = False
    for line in path.read_text().splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            skipping = stripped[1:-1] in names
        if not skipping:
            kept.append(line)
    path.write_text("".join(kept))
    assert not set(names) & set(read_ini(path).sections()), path.read_text()


def command_substitutions(
    options: str, graceful: tuple[float, float] | None
) -> list[tuple[str, str]]:
    """The app (with extra chaussette ``options`` before it) and, if given, the drain time
    and the manager's stop timeout: ``graceful = (drain, stop)``, drain < stop."""
    subs = [("myapp.wsgi:application", f"{options} {ROUTES_APP}".strip())]
    if graceful is not None:
        drain, stop = graceful
        assert drain < stop, "the manager must wait longer than chaussette drains"
        subs.insert(0, (f"--graceful-timeout {EXAMPLE_GRACEFUL[0]}", f"--graceful-timeout {drain}"))
    return subs


# -- processes --


def is_chaussette(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) chaussette process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and b"chaussette" in cmdline


def wait_gone(pids: set[int], timeout: float = 15) -> set[int]:
    """Wait until none of ``pids`` is a live chaussette; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = {pid for pid in pids if is_chaussette(pid)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = {pid for pid in alive if is_chaussette(pid)}
    return alive


def kill_workers(pids: set[int]) -> None:
    """SIGKILL every one of ``pids`` that is still a live chaussette."""
    for pid in pids:
        if is_chaussette(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Workers(set[int]):
    """Worker pids seen during a test, and the managers that started them."""

    def __init__(self) -> None:
        super().__init__()
        self.managers: list[Proc] = []


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Worker pids seen during a test. At teardown the managers given this set that are
    still running are killed first (a live manager would respawn the workers killed next),
    then whatever worker is still alive."""
    seen = Workers()
    yield seen
    for manager in seen.managers:
        if manager.popen.poll() is None:
            manager.kill()
    kill_workers(seen)


def run_tool(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT
    )


def pids_served(
    address: tuple[str, int] | str, expected: set[int], proc: Proc, attempts: int = 2000
) -> set[int]:
    """/pid answers until every expected worker has answered (bounded); the pids seen.
    A worker the manager reports may still be loading its app: the others answer
    meanwhile, so the loop paces itself instead of spending its attempts at once."""
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    for _ in range(attempts):
        resp = http_request(address, "/pid")
        assert resp.status == 200, resp.raw
        seen.add(int(resp.body))
        if seen >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert seen == expected, (
        f"{address}: answered by {sorted(seen)}, manager reports {sorted(expected)}\n"
        f"{proc.output()}"
    )
    return seen


def wait_answering(
    address: tuple[str, int] | str, pid: int, what: Callable[[], str], attempts: int = 2000
) -> None:
    """/pid on new connections until ``pid`` answers (bounded in count and time): the
    process is not only started but serves the shared socket."""
    deadline = time.monotonic() + 20
    answered: set[int] = set()
    for _ in range(attempts):
        resp = http_request(address, "/pid")
        assert resp.status == 200, resp.raw
        answered.add(int(resp.body))
        if pid in answered or time.monotonic() > deadline:
            break
        time.sleep(0.005)  # a process still importing its app has a moment to start
    assert pid in answered, f"{address}: {pid} never answered (only {sorted(answered)})\n{what()}"


def manager_log(proc: Proc, *extra: Path) -> str:
    parts = [proc.output()] + [p.read_text(errors="replace") for p in extra if p.exists()]
    return "\n".join(parts)


def wait_until(check: Callable[[], bool], what: str, proc: Proc, timeout: float = 30) -> None:
    poll_until(check, what, proc, timeout, interval=0.1)


# -- Circus --


class Circus:
    """circusd running examples/circus.ini: watchers ``web`` (TCP) and ``web_unix``.

    ``options``: chaussette options put before the app; ``graceful``: (chaussette
    --graceful-timeout, Circus graceful_timeout); ``unix=False`` leaves out the unix socket
    and its watcher; ``worker_log``: a file the workers log to instead of circusd's output
    (Circus drops what a stopped process still had in its output pipe, last lines
    included); ``workers``: a set every worker pid seen is added to.
    """

    def __init__(
        self,
        procs: Any,  # the procs fixture
        tmp: Path,
        logs: Path,
        *,
        options: str = "",
        graceful: tuple[float, float] | None = None,
        unix: bool = True,
        worker_log: Path | None = None,
        workers: set[int] | None = None,
    ) -> None:
        self.port = free_port()
        self.seen: set[int] = set()
        self._workers = workers
        self.worker_log = worker_log
        if worker_log is not None:
            options = f"{options} --log-output {worker_log}".strip()
        subs = [
            ("/srv/myapp/venv/bin/chaussette", chaussette_command()),
            ("/srv/myapp", str(ROOT)),
            ("/run/myapp", str(tmp)),
            *command_substitutions(options, graceful),
            ("8080", str(self.port)),
        ]
        if graceful is not None:
            subs.append(
                (f"graceful_timeout = {EXAMPLE_GRACEFUL[1]}", f"graceful_timeout = {graceful[1]}")
            )
        ini = render("circus.ini", logs / "circus.ini", subs)
        if not unix:
            drop_sections(ini, "socket:web_unix", "watcher:web_unix")
        config = read_ini(ini)
        self.endpoint = config["circus"]["endpoint"]
        self.pubsub = config["circus"]["pubsub_endpoint"]
        self.tcp = (config["socket:web"]["host"], int(config["socket:web"]["port"]))
        self.unix = config["socket:web_unix"]["path"] if unix else ""
        assert self.tcp[1] == self.port
        assert len(self.unix.encode()) < 108 and len(self.endpoint.encode()) < 108
        self.proc = procs.start([sys.executable, "-m", "circus.circusd", str(ini)])
        if isinstance(workers, Workers):
            workers.managers.append(self.proc)

    def _record(self, pids: set[int]) -> set[int]:
        self.seen |= pids
        if self._workers is not None:
            self._workers |= pids
        return pids

    def ctl(self, *args: str) -> str:
        result = run_tool(
            [
                sys.executable,
                "-m",
                "circus.circusctl",
                "--endpoint",
                self.endpoint,
                "--timeout",
                "60",
                *args,
            ]
        )
        assert result.returncode == 0, (
            f"circusctl {' '.join(args)}: {result.stdout}{result.stderr}\n{self.proc.output()}"
        )
        return result.stdout.strip()

    def call(self, command: str, timeout: float = 60, **props: object) -> dict[str, Any]:
        return circus_call(self.endpoint, self.proc, command, timeout, **props)

    def pids(self, watcher: str) -> set[int]:
        return self._record({int(p) for p in self.call("list", name=watcher)["pids"]})

    def running(self, watcher: str, count: int) -> set[int]:
        """The watcher's pids once it has ``count`` of them."""
        pids: set[int] = set()

        def enough() -> bool:
            nonlocal pids
            pids = self.pids(watcher)
            return len(pids) == count

        wait_until(enough, f"circus watcher {watcher} with {count} processes", self.proc)
        return pids

    def restart(self, watcher: str, count: int = 2) -> set[int]:
        """``restart WATCHER --waiting`` (stop all, start all; the socket stays open);
        the new pids once there are ``count`` of them (for ``web``: once each answered)."""
        return self._replace("restart", watcher, count)

    def reload(self, watcher: str, count: int = 2) -> set[int]:
        """``reload WATCHER --waiting`` (graceful: new processes first, then the old ones
        are stopped); the new pids once there are ``count`` of them (for ``web``: once
        each answered)."""
        return self._replace("reload", watcher, count)

    def _replace(self, command: str, watcher: str, count: int) -> set[int]:
        old = self.pids(watcher)
        out = self.ctl(command, watcher, "--waiting")
        assert out == "ok", f"circusctl {command} {watcher}: {out}\n{self.proc.output()}"
        new: set[int] = set()

        def replaced() -> bool:
            nonlocal new
            new = self.pids(watcher)
            return len(new) == count and not new & old

        wait_until(replaced, f"circus {command} {watcher}: {count} new processes", self.proc)
        if watcher == "web":
            # Started is not serving: each new process answers before the next step.
            for pid in new:
                wait_answering(self.tcp, pid, self.log)
        return new

    def log(self) -> str:
        return manager_log(self.proc, *([self.worker_log] if self.worker_log else []))


class Events:
    """Circus' pub/sub channel: 'watcher.<name>.<event>' topics with JSON bodies."""

    def __init__(self, endpoint: str) -> None:
        import zmq  # a dependency of circus

        self._zmq = zmq
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"watcher.")
        self.sock.connect(endpoint)

    def collect(
        self, want: Callable[[list[tuple[str, dict[str, Any]]]], bool], timeout: float = 20
    ) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while not want(events) and time.monotonic() < deadline:
            if self.sock.poll(100):
                topic, body = self.sock.recv_multipart()
                events.append((topic.decode(), json.loads(body)))
        return events

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


# -- Supervisor --


class Supervisor:
    """supervisord running examples/supervisor.conf: ``[fcgi-program:web]``, two processes
    ``web:web_0`` and ``web:web_1`` serving supervisord's TCP socket as fd 0.

    ``options``, ``graceful`` (chaussette --graceful-timeout, stopwaitsecs) and ``workers``
    as for :class:`Circus`; ``startsecs``: supervisord's, when given (default 1).
    """

    PROCESSES = ("web:web_0", "web:web_1")

    def __init__(
        self,
        procs: Any,  # the procs fixture
        tmp: Path,
        logs: Path,
        *,
        options: str = "",
        graceful: tuple[float, float] | None = None,
        startsecs: float | None = None,
        workers: set[int] | None = None,
    ) -> None:
        self.port = free_port()
        self.logs = logs
        self.seen: set[int] = set()
        self._workers = workers
        subs = [
            ("/srv/myapp/venv/bin/chaussette", chaussette_command()),
            ("/srv/myapp", str(ROOT)),
            ("/run/myapp", str(tmp)),
            ("/var/log/myapp", str(logs)),
            *command_substitutions(options, graceful),
            ("8080", str(self.port)),
        ]
        if graceful is not None:
            subs.append((f"stopwaitsecs = {EXAMPLE_GRACEFUL[1]}", f"stopwaitsecs = {graceful[1]}"))
        if startsecs is not None:
            subs.append(("numprocs = 2\n", f"numprocs = 2\nstartsecs = {startsecs}\n"))
        self.conf = render("supervisor.conf", logs / "supervisor.conf", subs)
        config = read_ini(self.conf)
        assert config["fcgi-program:web"]["socket"] == f"tcp://127.0.0.1:{self.port}"
        assert len(config["unix_http_server"]["file"].encode()) < 108
        self.tcp = ("127.0.0.1", self.port)
        self.log_path = Path(config["supervisord"]["logfile"])
        self.serverurl = config["supervisorctl"]["serverurl"]
        self.proc = procs.start(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)]
        )
        if isinstance(workers, Workers):
            workers.managers.append(self.proc)

    def _record(self, pids: set[int]) -> set[int]:
        self.seen |= pids
        if self._workers is not None:
            self._workers |= pids
        return pids

    def ctl(self, *args: str, check: bool = True) -> str:
        result = run_tool(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args]
        )
        if check:
            assert result.returncode == 0, (
                f"supervisorctl {' '.join(args)}: {result.stdout}{result.stderr}\n{self.log()}"
            )
        return result.stdout

    def status(self) -> dict[str, tuple[str, int | None]]:
        """group:name -> (state, pid), from supervisord's XML-RPC interface (what
        ``supervisorctl status`` asks, without starting a Python per poll). A new
        connection per call: supervisord may have just restarted a process."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(serverurl=self.serverurl)
        try:
            proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
            infos: list[dict[str, Any]] = proxy.supervisor.getAllProcessInfo()  # type: ignore[assignment]
        finally:
            transport.close()
        states: dict[str, tuple[str, int | None]] = {
            f"{i['group']}:{i['name']}": (i["statename"], i["pid"] or None) for i in infos
        }
        self._record({pid for _, pid in states.values() if pid})
        return states

    def running(self) -> set[int]:
        """The pids of web:web_0 and web:web_1 once both are RUNNING."""
        pids: set[int] = set()

        def both() -> bool:
            nonlocal pids
            states = self.status()
            pids = {pid for state, pid in states.values() if state == "RUNNING" and pid}
            return set(states) == set(self.PROCESSES) and len(pids) == 2

        wait_until(both, "supervisor programs web:web_0 and web:web_1 RUNNING", self.proc)
        return pids

    def restart_one(self, name: str) -> int:
        """``supervisorctl restart NAME``; wait until it is RUNNING under a new pid and
        that pid answers on the shared socket; the new pid."""
        old = self.status()[name][1]
        out = self.ctl("restart", name)
        assert f"{name}: started" in out, f"{out}\n{self.log()}"
        new = 0

        def renewed() -> bool:
            nonlocal new
            state, pid = self.status()[name]
            new = pid or 0
            return state == "RUNNING" and bool(pid) and pid != old

        wait_until(renewed, f"supervisor {name} RUNNING again under a new pid", self.proc)
        wait_answering(self.tcp, new, self.log)
        return new

    def rolling_restart(self) -> set[int]:
        """One process at a time, so that one always serves supervisord's socket (which
        it closes while no process uses it); the new pids."""
        return {self.restart_one(name) for name in self.PROCESSES}

    def log(self) -> str:
        return manager_log(self.proc, self.log_path, *sorted(self.logs.glob("web_*.log")))


def circus_call(
    endpoint: str, proc: Proc, command: str, timeout: float = 60, **props: object
) -> dict[str, Any]:
    """One command over Circus' control channel from this process (what circusctl sends,
    without starting a Python per poll); the answer, checked to be "ok"."""
    import zmq  # a dependency of circus

    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.connect(endpoint)
        call_id = uuid.uuid4().hex
        sock.send_json({"id": call_id, "command": command, "properties": props})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.popen.poll() is None:
            if sock.poll(100):
                answer = sock.recv_json()
                if isinstance(answer, dict) and answer.get("id") == call_id:
                    break
        else:
            raise AssertionError(f"circus {command}: no answer\n{proc.output()}")
    finally:
        sock.close(linger=0)
        context.term()
    assert answer.get("status") == "ok", f"circus {command} {props}: {answer}\n{proc.output()}"
    return answer
