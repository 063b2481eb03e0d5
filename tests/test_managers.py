"""Real Circus and real Supervisor running the SHIPPED example files.

examples/circus.ini and examples/supervisor.conf are read as they are; only the values an
operator is told to adapt are substituted (port, directories, the chaussette command, the
app). If a test needs anything more, the example is what must change.

Each manager is started in its own session; its workers are recorded as they are seen
(the managers put them in sessions or process groups of their own) and killed at teardown
if anything is left.
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, ROUTES_APP, Proc, free_port, http_request, poll_until, wait_http

EXAMPLES = ROOT / "examples"


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


@pytest.fixture
def workers() -> Iterator[set[int]]:
    """Worker pids seen during a test; whatever is still alive at teardown is killed."""
    seen: set[int] = set()
    yield seen
    for pid in seen:
        if is_chaussette(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run_tool(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT
    )


def pids_served(
    address: tuple[str, int] | str, expected: set[int], proc: Proc, attempts: int = 300
) -> set[int]:
    """/pid answers until every expected worker has answered (bounded); the pids seen."""
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    for _ in range(attempts):
        resp = http_request(address, "/pid")
        assert resp.status == 200, resp.raw
        seen.add(int(resp.body))
        if seen >= expected or time.monotonic() > deadline:
            break
    assert seen == expected, (
        f"{address}: answered by {sorted(seen)}, manager reports {sorted(expected)}\n"
        f"{proc.output()}"
    )
    return seen


def manager_log(proc: Proc, *extra: Path) -> str:
    parts = [proc.output()] + [p.read_text(errors="replace") for p in extra if p.exists()]
    return "\n".join(parts)


def wait_until(check: Callable[[], bool], what: str, proc: Proc, timeout: float = 30) -> None:
    poll_until(check, what, proc, timeout, interval=0.1)


# -- Circus --


class Circus:
    def __init__(self, procs, tmp: Path, logs: Path) -> None:
        self.port = free_port()
        ini = render(
            "circus.ini",
            logs / "circus.ini",
            [
                ("/srv/myapp/venv/bin/chaussette", chaussette_command()),
                ("/srv/myapp", str(ROOT)),
                ("/run/myapp", str(tmp)),
                ("myapp.wsgi:application", ROUTES_APP),
                ("8080", str(self.port)),
            ],
        )
        config = read_ini(ini)
        self.endpoint = config["circus"]["endpoint"]
        self.pubsub = config["circus"]["pubsub_endpoint"]
        self.tcp = (config["socket:web"]["host"], int(config["socket:web"]["port"]))
        self.unix = config["socket:web_unix"]["path"]
        assert self.tcp[1] == self.port
        assert len(self.unix.encode()) < 108 and len(self.endpoint.encode()) < 108
        self.proc = procs.start([sys.executable, "-m", "circus.circusd", str(ini)])

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

    def pids(self, watcher: str) -> set[int]:
        out = self.ctl("list", watcher)
        return {int(p) for p in out.split(",") if p.strip()}

    def running(self, watcher: str, count: int) -> set[int]:
        """The watcher's pids once it has ``count`` of them."""
        pids: set[int] = set()

        def enough() -> bool:
            nonlocal pids
            pids = self.pids(watcher)
            return len(pids) == count

        wait_until(enough, f"circus watcher {watcher} with {count} processes", self.proc)
        return pids


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
        self, want: Callable[[list[tuple[str, dict]]], bool], timeout: float = 20
    ) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        deadline = time.monotonic() + timeout
        while not want(events) and time.monotonic() < deadline:
            if self.sock.poll(100):
                topic, body = self.sock.recv_multipart()
                events.append((topic.decode(), json.loads(body)))
        return events

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def test_circus_example(procs, short_tmp, tmp_path, workers):
    circus = Circus(procs, short_tmp, tmp_path)
    events = Events(circus.pubsub)
    try:
        wait_http(circus.tcp, circus.proc)
        wait_http(circus.unix, circus.proc)
        web, unix = circus.running("web", 2), circus.running("web_unix", 2)
        workers.update(web | unix)
        assert not web & unix
        # Two processes share each socket, and each of them answers.
        pids_served(circus.tcp, web, circus.proc)
        pids_served(circus.unix, unix, circus.proc)

        # Per watcher: Circus keeps the sockets open (a bare "restart" restarts circusd
        # itself and rebinds them).
        assert circus.ctl("restart", "web", "--waiting") == "ok"
        assert circus.ctl("restart", "web_unix", "--waiting") == "ok"
        new_web, new_unix = circus.running("web", 2), circus.running("web_unix", 2)
        workers.update(new_web | new_unix)
        assert not (new_web | new_unix) & (web | unix), "restart kept old workers"
        assert wait_gone(web | unix) == set(), "old workers still running after restart"
        pids_served(circus.tcp, new_web, circus.proc)
        # The old workers left Circus' socket file alone (they did not bind it).
        pids_served(circus.unix, new_unix, circus.proc)

        # Each old worker drained and exited 0 on Circus' SIGTERM (a SIGKILL after
        # graceful_timeout would be reported as -9).
        def all_reaped(seen: list[tuple[str, dict]]) -> bool:
            reaped = {e["process_pid"] for t, e in seen if t.endswith(".reap")}
            return reaped >= web | unix

        reaps = {
            e["process_pid"]: e["exit_code"]
            for topic, e in events.collect(all_reaped)
            if topic.endswith(".reap")
        }
        exits = {pid: reaps.get(pid) for pid in web | unix}
        assert exits == dict.fromkeys(web | unix, 0), f"exit codes {exits}\n{circus.proc.output()}"
    finally:
        events.close()

    assert circus.ctl("quit", "--waiting") == "ok"
    assert circus.proc.wait(60) == 0
    assert wait_gone(workers) == set(), f"workers left after quit\n{circus.proc.output()}"
    log = circus.proc.output()
    # circusd exits 0 even when it failed: its log says whether it did.
    for bad in ("[ERROR]", "[CRITICAL]", "Traceback"):
        assert bad not in log, log
    assert "web stopped" in log and "web_unix stopped" in log, log


def test_circusd_sigterm_stops_workers(procs, short_tmp, tmp_path, workers):
    circus = Circus(procs, short_tmp, tmp_path)
    wait_http(circus.tcp, circus.proc)
    wait_http(circus.unix, circus.proc)
    pids = circus.running("web", 2) | circus.running("web_unix", 2)
    workers.update(pids)
    circus.proc.send(signal.SIGTERM)
    assert circus.proc.wait(60) == 0
    assert wait_gone(pids) == set(), f"workers left after SIGTERM\n{circus.proc.output()}"
    log = circus.proc.output()
    for bad in ("[ERROR]", "[CRITICAL]", "Traceback"):
        assert bad not in log, log


# -- Supervisor --


class Supervisor:
    def __init__(self, procs, tmp: Path, logs: Path) -> None:
        self.port = free_port()
        self.logs = logs
        self.conf = render(
            "supervisor.conf",
            logs / "supervisor.conf",
            [
                ("/srv/myapp/venv/bin/chaussette", chaussette_command()),
                ("/srv/myapp", str(ROOT)),
                ("/run/myapp", str(tmp)),
                ("/var/log/myapp", str(logs)),
                ("myapp.wsgi:application", ROUTES_APP),
                ("8080", str(self.port)),
            ],
        )
        config = read_ini(self.conf)
        assert config["fcgi-program:web"]["socket"] == f"tcp://127.0.0.1:{self.port}"
        assert len(config["unix_http_server"]["file"].encode()) < 108
        self.tcp = ("127.0.0.1", self.port)
        self.log_path = Path(config["supervisord"]["logfile"])
        self.proc = procs.start(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)]
        )

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
        """name -> (state, pid) from ``supervisorctl status``."""
        states: dict[str, tuple[str, int | None]] = {}
        for line in self.ctl("status", check=False).splitlines():
            fields = line.split()
            if len(fields) >= 2 and ":" in fields[0]:
                pid = None
                if len(fields) >= 4 and fields[2] == "pid":
                    pid = int(fields[3].rstrip(","))
                states[fields[0]] = (fields[1], pid)
        return states

    def running(self) -> set[int]:
        """The pids of web:web_0 and web:web_1 once both are RUNNING."""
        pids: set[int] = set()

        def both() -> bool:
            nonlocal pids
            states = self.status()
            pids = {pid for state, pid in states.values() if state == "RUNNING" and pid}
            return set(states) == {"web:web_0", "web:web_1"} and len(pids) == 2

        wait_until(both, "supervisor programs web:web_0 and web:web_1 RUNNING", self.proc)
        return pids

    def log(self) -> str:
        return manager_log(self.proc, self.log_path, *sorted(self.logs.glob("web_*.log")))


def test_supervisor_example(procs, short_tmp, tmp_path, workers):
    sup = Supervisor(procs, short_tmp, tmp_path)
    first = sup.running()
    workers.update(first)
    wait_http(sup.tcp, sup.proc)
    # Both processes inherited the one socket as fd 0, and each of them answers.
    pids_served(sup.tcp, first, sup.proc)

    out = sup.ctl("restart", "web:*")
    assert "web:web_0: started" in out and "web:web_1: started" in out, out
    second = sup.running()
    workers.update(second)
    assert not second & first, "restart kept old workers"
    assert wait_gone(first) == set(), "old workers still running after restart"
    wait_http(sup.tcp, sup.proc)
    pids_served(sup.tcp, second, sup.proc)

    sup.ctl("shutdown")
    assert sup.proc.wait(60) == 0
    assert wait_gone(workers) == set(), f"workers left after shutdown\n{sup.log()}"
    log = sup.log_path.read_text()
    # Every stop (2 for the restart, 2 for the shutdown) was chaussette's clean exit on
    # SIGTERM, not a SIGKILL after stopwaitsecs.
    for name in ("web_0", "web_1"):
        assert log.count(f"stopped: {name} (exit status 0)") == 2, sup.log()
    for bad in (" ERRO ", "Traceback", "terminated by", "FATAL", "BACKOFF"):
        assert bad not in log, sup.log()
