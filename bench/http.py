"""HTTP benchmark: chaussette's http backends against the same libraries run by themselves,
gunicorn's workers, granian, and nginx ``return 200`` as the ceiling of the machine.

    python -m bench.http --list      what would run, what is skipped and why
    python -m bench.http --quick     a smoke run (one round of 1 s per scenario)
    python -m bench.http             the full run (its length is printed first)
    python -m bench.http --only chaussette-gevent gunicorn-gevent

Every server serves ``bench.apps:app`` on 127.0.0.1, pinned to one core while wrk runs on
another. Each round starts every server afresh (round-robin, the order rotated each round),
warms it up, then runs wrk once per scenario; the table gives the median of the rounds. A
chaussette row and the native row it is compared with run side by side: both are started,
then each scenario is run on one and then the other, so that the runs compared are seconds
apart. Besides req/s, the server's CPU time per request is measured: it is what a request
costs, and moves much less than req/s when something else runs on the machine.
bench/README.md explains the method and the columns.
"""

# ruff: noqa: E402  (sys.path is fixed before the imports it affects)
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# `python bench/http.py` puts bench/ first on sys.path, where this file would hide the
# standard library's `http` package from everything imported after it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
import contextlib
import fnmatch
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from chaussette.backends import registry

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
APP = "bench.apps:app"
HELLO_BODY = "Hello from chaussette\n"  # bench.apps.HELLO, for nginx
READY_TIMEOUT = 30.0  # seconds from spawn to the first 200 before a server is "failed"
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL
RSS_EVERY = 0.25  # seconds between RSS samples during a wrk run
MB = 1_000_000

# -- scenarios ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    path: str
    method: str = "GET"
    body_size: int = 0


SCENARIOS = (
    Scenario("hello", "hello: GET / (22-byte body)", "/"),
    Scenario("big", "64 KiB response: GET /big", "/big"),
    Scenario("post", "1 MB POST: POST /upload, read in 64 KiB chunks", "/upload", "POST", MB),
)

# wrk calls done() once at the end; the JSON line it prints is all the harness reads.
_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-JSON {\\"requests\\": %.0f, \\"duration_us\\": %.0f, \\"connect\\": %.0f, "
    .. "\\"read\\": %.0f, \\"write\\": %.0f, \\"status\\": %.0f, \\"timeout\\": %.0f, "
    .. "\\"p99_us\\": %.0f}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(99)))
end
"""


def wrk_script(scenario: Scenario) -> str:
    lines = ["-- written by bench/http.py"]
    if scenario.method != "GET":
        lines.append(f'wrk.method = "{scenario.method}"')
    if scenario.body_size:
        lines.append(f'wrk.body = string.rep("x", {scenario.body_size})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    return "\n".join(lines) + "\n" + _WRK_DONE


# -- the servers -------------------------------------------------------------------------

Command = Callable[[int, Path], list[str]]  # (port, a fresh scratch dir) -> argv


@dataclass
class Target:
    name: str  # the row, and what --only matches
    kind: str  # chaussette, native, gunicorn, granian, nginx
    command: Command | None
    native: str | None = None  # the row a chaussette backend is compared with
    skip: str | None = None  # why it cannot run here
    note: str = ""


def _script(name: str) -> str | None:
    """A console script of this venv, else one on PATH."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


def _missing(*modules: str) -> str | None:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def chaussette_argv() -> list[str]:
    script = _script("chaussette")
    return [script] if script else [sys.executable, "-m", "chaussette"]


def _chaussette(backend: str) -> Command:
    def command(port: int, scratch: Path) -> list[str]:
        return [*chaussette_argv(), "--backend", backend, "--host", HOST, "--port", str(port), APP]

    return command


def _native(library: str) -> Command:
    def command(port: int, scratch: Path) -> list[str]:
        return [sys.executable, "-m", "bench.native", library, HOST, str(port)]

    return command


def _waitress(port: int, scratch: Path) -> list[str]:
    return [str(_script("waitress-serve")), f"--listen={HOST}:{port}", APP]


def _gunicorn(worker: str, *extra: str) -> Command:
    def command(port: int, scratch: Path) -> list[str]:
        return [
            str(_script("gunicorn")),
            *("--bind", f"{HOST}:{port}", "--workers", "1", "--worker-class", worker),
            *extra,
            APP,
        ]

    return command


def _granian(port: int, scratch: Path) -> list[str]:
    return [
        str(_script("granian")),
        *("--interface", "wsgi", "--host", HOST, "--port", str(port), "--workers", "1"),
        APP,
    ]


def _nginx(port: int, scratch: Path) -> list[str]:
    """nginx from a temp prefix: everything it writes stays inside ``scratch``."""
    for sub in ("conf", "logs", "tmp"):
        (scratch / sub).mkdir()
    big = scratch / "big.bin"
    big.write_bytes(b"x" * 65536)
    # As root the worker runs as nobody: it must be able to reach big.bin through the two
    # directories the harness made (mkdtemp makes them 0700).
    for path in (scratch, scratch.parent):
        path.chmod(0o755)
    big.chmod(0o644)
    temp = " ".join(
        f"{kind}_temp_path {scratch}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (scratch / "conf" / "nginx.conf").write_text(
        f"""
worker_processes 1;
pid {scratch}/logs/nginx.pid;
error_log {scratch}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temp}
    client_max_body_size 8m;
    keepalive_requests 1000000;
    sendfile on;
    server {{
        listen {HOST}:{port};
        default_type text/plain;
        location = /big {{ alias {big}; }}
        location / {{ return 200 "{HELLO_BODY.strip()}\\n"; }}
    }}
}}
"""
    )
    nginx = str(shutil.which("nginx"))
    return [nginx, "-p", f"{scratch}/", "-c", "conf/nginx.conf", "-g", "daemon off;"]


# chaussette backend -> the library run by itself, and what that native row is
NATIVES: dict[str, tuple[str, str, Command, tuple[str, ...]]] = {
    # backend: (row, what it is, command, modules it needs)
    "wsgiref": ("native-wsgiref", "wsgiref.simple_server", _native("wsgiref"), ()),
    "waitress": ("native-waitress", "waitress-serve", _waitress, ("waitress",)),
    "gevent": ("native-gevent", "gevent.pywsgi.WSGIServer", _native("gevent"), ("gevent",)),
    "fastgevent": ("native-gevent", "gevent.pywsgi.WSGIServer", _native("gevent"), ("gevent",)),
    "meinheld": ("native-meinheld", "meinheld.server.run", _native("meinheld"), ("meinheld",)),
    "eventlet": ("native-eventlet", "eventlet.wsgi.server", _native("eventlet"), ("eventlet",)),
    "tornado": (
        "native-tornado",
        "tornado HTTPServer(WSGIContainer(app))",
        _native("tornado"),
        ("tornado",),
    ),
    "bjoern": ("native-bjoern", "bjoern.run", _native("bjoern"), ("bjoern",)),
    "geventwebsocket": (
        "native-geventwebsocket",
        "pywsgi.WSGIServer + geventwebsocket WebSocketHandler",
        _native("geventwebsocket"),
        ("gevent", "geventwebsocket"),
    ),
    "geventws4py": (
        "native-ws4py",
        "ws4py.server.geventserver.WSGIServer",
        _native("ws4py"),
        ("gevent", "ws4py"),
    ),
    "socketio": (
        "native-geventwebsocket",
        "pywsgi.WSGIServer + geventwebsocket WebSocketHandler",
        _native("geventwebsocket"),
        ("gevent", "geventwebsocket"),
    ),
}


def _program_skip(program: str, package: str) -> str | None:
    return None if _script(program) else f"{program} not found ({package})"


def build_targets() -> list[Target]:
    """Every row, in table order: each chaussette backend followed by its native runner,
    then gunicorn's workers, granian and nginx. Rows that cannot run carry ``skip``."""
    targets: list[Target] = []
    seen: set[str] = set()
    for info in [b for b in registry.all_backends() if b.protocol == "http"]:
        native = NATIVES.get(info.name)
        missing = info.missing()
        skip = f"needs {', '.join(missing)}: {registry.install_hint(info)}" if missing else None
        targets.append(
            Target(
                f"chaussette-{info.name}",
                "chaussette",
                _chaussette(info.name),
                native=native[0] if native else None,
                skip=skip,
                note=info.summary,
            )
        )
        if native and native[0] not in seen:
            seen.add(native[0])
            row, what, command, modules = native
            skip = _missing(*modules)
            if row == "native-waitress":
                skip = skip or _program_skip("waitress-serve", "pip install waitress")
            if row == "native-meinheld" and skip:
                skip += " (meinheld needs chaussette's greenlet-3 build: see bench/README.md)"
            targets.append(Target(row, "native", command, skip=skip, note=what))
    gunicorn = _program_skip("gunicorn", "pip install 'chaussette[bench]'")
    for worker, modules, extra in (
        ("sync", (), ()),
        ("gthread", (), ("--threads", "10")),
        ("gevent", ("gevent",), ()),
        ("eventlet", ("eventlet",), ()),
    ):
        targets.append(
            Target(
                f"gunicorn-{worker}",
                "gunicorn",
                _gunicorn(worker, *extra),
                skip=gunicorn or _missing(*modules),
                note=f"gunicorn -w 1 -k {worker} {' '.join(extra)}".rstrip(),
            )
        )
    targets.append(
        Target(
            "granian",
            "granian",
            _granian,
            skip=_program_skip("granian", "pip install 'chaussette[bench]'"),
            note="granian --interface wsgi --workers 1",
        )
    )
    targets.append(
        Target(
            "nginx",
            "nginx",
            _nginx,
            skip=None if shutil.which("nginx") else "nginx not found (apt-get install nginx)",
            note="nginx return 200, 1 worker: the ceiling",
        )
    )
    return targets


def select(targets: list[Target], patterns: Sequence[str]) -> list[Target]:
    """The rows matching ``--only`` globs, plus the native rows of the chaussette rows
    chosen (for the "vs native" ratio) and nginx (for "vs nginx")."""
    chosen = {t.name for t in targets if any(fnmatch.fnmatch(t.name, p) for p in patterns)}
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(t.name, p) for t in targets)]
    if unknown:
        names = " ".join(t.name for t in targets)
        raise SystemExit(f"--only {' '.join(unknown)}: no such server; choose from {names}")
    chosen |= {t.native for t in targets if t.name in chosen and t.native}
    chosen.add("nginx")
    return [t for t in targets if t.name in chosen]


# -- processes ---------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (gunicorn's workers, nginx's, granian's)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, in bytes (shared pages counted
    once per process, as ``ps`` does)."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def tree_cpu_ns(pid: int) -> int:
    """CPU time used so far by ``pid``, its descendants and all their threads, in ns (the
    scheduler's own count: /proc/PID/task/TID/schedstat, not the 10 ms ticks of stat)."""
    total = 0
    for p in descendants(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def probe(port: int) -> int | None:
    """The status code of ``GET /``, or None when nothing answers."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = b""
            while b"\r\n" not in head and len(head) < 1024:
                data = sock.recv(1024)
                if not data:
                    break
                head += data
    except OSError:
        return None
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHAUSSETTE_", "LISTEN_", "GRANIAN_", "GUNICORN_"))
        and k != "NOTIFY_SOCKET"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class StartFailed(Exception):
    pass


class Server:
    """One server process (and its children), pinned to ``cpu``, output in ``log``."""

    def __init__(self, argv: list[str], cpu: int | None, log: Path) -> None:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.log = log
        self.started = time.perf_counter()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*pin, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=child_env(),
                start_new_session=True,  # its own group: stop() reaches every worker
            )

    def wait_ready(self, port: int) -> float:
        """Seconds from spawn to the first ``200`` on ``GET /``."""
        status = None
        while time.perf_counter() - self.started < READY_TIMEOUT:
            status = probe(port)
            if status == 200:
                return time.perf_counter() - self.started
            if self.proc.poll() is not None:
                raise StartFailed(f"exited with code {self.proc.returncode}: {self.tail()}")
            time.sleep(0.002 if status is None else 0.05)
        got = f"last answer {status}" if status else "nothing answered"
        raise StartFailed(f"no 200 within {READY_TIMEOUT:.0f} s ({got}): {self.tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no output)"
        return " | ".join(lines[-3:]) or "(no output)"

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # a worker may outlive its master for a moment: the group goes too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return


# -- one measurement ---------------------------------------------------------------------


@dataclass
class Sample:
    rps: float  # successful (2xx/3xx) responses per second
    p99_ms: float
    rss: int  # peak resident memory of the server's processes during the run, bytes
    requests: int
    errors: int  # connect/read/write errors, timeouts and non-2xx/3xx answers
    # CPU the server (all its processes and threads) used per request during the run, in µs:
    # what a request costs, whatever else ran on the machine meanwhile
    cpu_us: float | None = None
    round_no: int = -1  # the round it was measured in (pairs rows of the same round)


@dataclass
class Options:
    duration: int
    warmup: int
    runs: int
    connections: int
    server_cpu: int | None
    client_cpu: int | None
    scenarios: tuple[Scenario, ...]
    scripts: dict[str, Path] = field(default_factory=dict)


def run_wrk(opts: Options, scenario: Scenario, port: int, seconds: int, server: Server) -> Sample:
    pin = ["taskset", "-c", str(opts.client_cpu)] if opts.client_cpu is not None else []
    argv = [
        *pin,
        "wrk",
        *("-t1", f"-c{opts.connections}", f"-d{seconds}s", "--timeout", "2s"),
        *("-s", str(opts.scripts[scenario.name])),
        f"http://{HOST}:{port}{scenario.path}",
    ]
    peak = 0
    cpu_before = tree_cpu_ns(server.proc.pid)
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as wrk:
        deadline = time.monotonic() + seconds + 30
        while wrk.poll() is None and time.monotonic() < deadline:
            peak = max(peak, tree_rss(server.proc.pid))
            time.sleep(RSS_EVERY)
        if wrk.poll() is None:
            wrk.kill()
        output = wrk.communicate()[0].decode(errors="replace")
    cpu = tree_cpu_ns(server.proc.pid) - cpu_before
    line = next((x for x in output.splitlines() if x.startswith("BENCH-JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {output.strip()[-300:]}")
    r = json.loads(line.removeprefix("BENCH-JSON "))
    ok = r["requests"] - r["status"]
    errors = r["connect"] + r["read"] + r["write"] + r["timeout"] + r["status"]
    if ok <= 0:
        raise RuntimeError(f"no successful response ({errors} errors)")
    return Sample(
        rps=ok / (r["duration_us"] / 1e6),
        p99_ms=r["p99_us"] / 1000,
        rss=peak,
        requests=r["requests"],
        errors=errors,
        cpu_us=cpu / 1000 / r["requests"] if cpu > 0 and r["requests"] else None,
    )


# -- the run -----------------------------------------------------------------------------


@dataclass
class Result:
    target: Target
    startups: list[float] = field(default_factory=list)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)  # scenario -> why not
    failed: str | None = None  # could not start: not retried

    def median(self, scenario: str, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.samples.get(scenario, [])]
        return statistics.median(values) if values else None


@dataclass
class Launch:
    """``chaussette`` alone (default backend and app): spawn to first 200, idle RSS."""

    startups: list[float] = field(default_factory=list)
    idle_rss: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def measure_target(result: Result, opts: Options, scratch: Path, round_no: int = -1) -> None:
    """One server, alone: started, every scenario measured, stopped."""
    measure_group([result], opts, scratch, round_no)


def measure_group(
    group: Sequence[Result], opts: Options, scratch: Path, round_no: int = -1
) -> None:
    """Servers compared with each other (a chaussette row and its library's native row),
    measured side by side: all are started (pinned to the same core, idle but for the one
    wrk is loading), then each scenario is run on each in turn, in the order given. So the
    runs being compared are seconds apart, not the length of a whole server's turn: what
    else the machine does moves both alike."""
    running: list[tuple[Result, Server, int]] = []
    try:
        for result in group:
            target = result.target
            assert target.command is not None
            port = free_port()
            work = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=scratch))
            server = Server(target.command(port, work), opts.server_cpu, work / "output.log")
            running.append((result, server, port))
            try:
                result.startups.append(server.wait_ready(port))
            except StartFailed as exc:
                result.failed = f"failed to start: {exc}"
                server.stop()
                running.pop()
        broken: set[str] = set()
        for i, scenario in enumerate(opts.scenarios):
            for result, server, port in running:
                if result.target.name in broken:
                    continue
                try:
                    if opts.warmup:
                        run_wrk(opts, scenario, port, opts.warmup, server)
                    sample = run_wrk(opts, scenario, port, opts.duration, server)
                    if not server.alive():
                        raise RuntimeError(f"exited ({server.proc.returncode}): {server.tail()}")
                except RuntimeError as exc:
                    result.failures.setdefault(scenario.name, []).append(str(exc))
                    for later in opts.scenarios[i + 1 :]:  # not run in this round
                        why = f"not run: the server failed in {scenario.name}"
                        result.failures.setdefault(later.name, []).append(why)
                    broken.add(result.target.name)
                    server.stop()
                    continue
                sample.round_no = round_no
                result.samples.setdefault(scenario.name, []).append(sample)
    finally:
        for _, server, _ in running:
            server.stop()


def groups_of(results: list[Result]) -> list[list[Result]]:
    """The rows measured side by side: each native row with the chaussette rows compared
    with it; every other row alone. In table order."""
    by_native: dict[str, list[Result]] = {}
    for r in results:
        if r.target.native:
            by_native.setdefault(r.target.native, []).append(r)
    groups: list[list[Result]] = []
    placed: set[str] = set()
    for r in results:
        if r.target.name in placed:
            continue
        key = r.target.native or r.target.name
        members = [*by_native.get(key, [])]
        native = next((x for x in results if x.target.name == key), None)
        if native is not None and native not in members:
            members.append(native)
        members = [m for m in members if m.target.name not in placed] or [r]
        placed.update(m.target.name for m in members)
        groups.append(members)
    return groups


def measure_launch(launch: Launch, opts: Options, scratch: Path) -> None:
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="launch-", dir=scratch))
    argv = [*chaussette_argv(), "--backend", "wsgiref", "--port", str(port)]
    server = Server(argv, opts.server_cpu, work / "output.log")
    try:
        launch.startups.append(server.wait_ready(port))
        time.sleep(1.0)  # let it settle: idle means after the first request
        launch.idle_rss.append(tree_rss(server.proc.pid))
    except StartFailed as exc:
        launch.failures.append(str(exc))
    finally:
        server.stop()


def run_all(
    targets: list[Target], opts: Options, scratch: Path, quiet: bool
) -> tuple[list[Result], Launch, bool]:
    results = [Result(t) for t in targets if t.skip is None]
    groups = groups_of(results)
    launch = Launch()
    interrupted = False
    try:
        for round_no in range(opts.runs):
            shift = round_no % len(groups) if groups else 0
            order = groups[shift:] + groups[:shift]  # round-robin, rotated each round
            for group in order:
                # within a group, who goes first alternates from round to round
                members = [r for r in (group if round_no % 2 == 0 else group[::-1]) if not r.failed]
                if not members:
                    continue
                if not quiet:
                    names = ", ".join(r.target.name for r in members)
                    print(f"  round {round_no + 1}/{opts.runs}: {names}", flush=True)
                measure_group(members, opts, scratch, round_no)
            measure_launch(launch, opts, scratch)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: reporting what was measured", file=sys.stderr)
    return results, launch, interrupted


# -- the report --------------------------------------------------------------------------


def _rps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} ms" if x < 10 else f"{x:.0f} ms"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / MB:.1f} MB"


def _spread(values: list[float]) -> str:
    """Half the range of the rounds, as a share of their median: the noise of a row."""
    if len(values) < 2:
        return "-"
    return f"{50 * (max(values) - min(values)) / statistics.median(values):.0f}%"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} µs" if x < 100 else f"{x:.0f} µs"


def paired_ratios(row: Result, native: Result, scenario: str, attr: str = "rps") -> list[float]:
    """``row`` over ``native`` in each round where both were measured (side by side), for
    req/s; for ``cpu_us`` the other way round (native's cost over the row's), so that above
    1 always means the row does better. Empty when no round has both."""
    theirs = {s.round_no: getattr(s, attr) for s in native.samples.get(scenario, [])}
    ratios = []
    for sample in row.samples.get(scenario, []):
        a, b = getattr(sample, attr), theirs.get(sample.round_no)
        if sample.round_no < 0 or not a or not b:
            continue
        ratios.append(b / a if attr == "cpu_us" else a / b)
    return ratios


def vs_native(row: Result, native: Result, scenario: str, attr: str = "rps") -> float | None:
    """The median of the paired ratios; without pairs, the ratio of the medians."""
    ratios = paired_ratios(row, native, scenario, attr)
    if ratios:
        return statistics.median(ratios)
    a, b = row.median(scenario, attr), native.median(scenario, attr)
    if a is None or not b:
        return None
    return b / a if attr == "cpu_us" else a / b


def scenario_rows(results: list[Result], scenario: Scenario, with_startup: bool) -> list[list[str]]:
    by_name = {r.target.name: r for r in results}
    nginx = by_name.get("nginx")
    ceiling = nginx.median(scenario.name, "rps") if nginx else None
    header = ["server", "req/s", "±", "p99", "RSS", "CPU/req", "vs native", "CPU vs native"]
    header.append("vs nginx")
    if with_startup:
        header.append("startup")
    header.append("errors")
    rows = [header]
    for r in results:
        rps = r.median(scenario.name, "rps")
        native = by_name.get(r.target.native or "")
        if rps is None:
            reason = r.failed or "; ".join(r.failures.get(scenario.name, [])) or "not measured"
            row = [r.target.name, f"failed: {reason[:160]}"] + [""] * (len(header) - 2)
            rows.append(row)
            continue
        samples = r.samples[scenario.name]
        requests = sum(s.requests for s in samples)
        errors = sum(s.errors for s in samples)
        cpu = [s.cpu_us for s in samples if s.cpu_us is not None]
        ratio = vs_native(r, native, scenario.name) if native else None
        cpu_ratio = vs_native(r, native, scenario.name, "cpu_us") if native and cpu else None
        row = [
            r.target.name,
            _rps(rps),
            _spread([s.rps for s in samples]),
            _ms(r.median(scenario.name, "p99_ms")),
            _mb(r.median(scenario.name, "rss")),
            _us(statistics.median(cpu) if cpu else None),
            "-" if ratio is None else f"{ratio:.2f}x",
            "-" if cpu_ratio is None else f"{cpu_ratio:.2f}x",
            _ratio(rps, ceiling) if r.target.kind != "nginx" else "1.00x",
        ]
        if with_startup:
            row.append(f"{statistics.median(r.startups):.2f} s" if r.startups else "-")
        err = "0" if not errors else f"{errors} ({100 * errors / max(requests, 1):.1f}%)"
        if r.failures.get(scenario.name):
            err += f"; {len(r.failures[scenario.name])} run(s) failed"
        row.append(err)
        rows.append(row)
    return rows


def _numeric(cell: str) -> bool:
    return not cell or cell == "-" or cell[0].isdigit() or cell.startswith("failed")


def markdown_table(rows: list[list[str]]) -> str:
    """Columns of numbers are right-aligned."""
    align = [
        "--:" if i and all(_numeric(row[i]) for row in rows[1:]) else "---"
        for i in range(len(rows[0]))
    ]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


_RST_SPECIAL = str.maketrans({c: "\\" + c for c in "\\*`_|[]<>"})


def _rst(text: str) -> str:
    """Text as itself in reStructuredText (a log line may hold any markup)."""
    if not text:
        return "\\ "  # an escaped space: an empty cell that is still a cell
    text = text.translate(_RST_SPECIAL)
    return "\\" + text if text[0] in "-+#=:." else text  # not a list, title or comment


def rst_table(rows: list[list[str]], title: str) -> str:
    lines = [f".. list-table:: {_rst(title)}", "   :header-rows: 1", ""]
    for row in rows:
        lines.append(f"   * - {_rst(row[0])}")
        lines += [f"     - {_rst(c)}" for c in row[1:]]
    return "\n".join(lines)


@dataclass
class Check:
    target: str
    goal: str
    measured: str
    met: bool | None  # None: not measured


def check_targets(results: list[Result], launch: Launch) -> list[Check]:
    by_name = {r.target.name: r for r in results}

    def hello(name: str) -> float | None:
        r = by_name.get(name)
        return r.median("hello", "rps") if r else None

    checks = []
    for attr, title in (
        ("rps", "every backend vs its native runner (req/s)"),
        ("cpu_us", "every backend vs its native runner (server CPU per request)"),
    ):
        ratios = []
        for r in results:
            native = by_name.get(r.target.native or "")
            if r.target.kind != "chaussette" or native is None:
                continue
            for scenario in r.samples:
                x = vs_native(r, native, scenario, attr)
                if x is not None:
                    rounds = paired_ratios(r, native, scenario, attr)
                    spread = f", rounds {min(rounds):.2f}-{max(rounds):.2f}" if rounds else ""
                    ratios.append((x, f"{r.target.name} {scenario}", spread))
        if ratios:
            low = sorted(ratios)
            below = [f"{what} {x:.2f}x{spread}" for x, what, spread in low if x < 0.97]
            measured = f"lowest {low[0][0]:.2f}x ({low[0][1]}{low[0][2]})"
            if below:
                measured += "; below: " + "; ".join(below)
            checks.append(Check(title, ">= 0.97x", measured, not below))
        else:
            checks.append(Check(title, ">= 0.97x", "-", None))

    a, b = hello("chaussette-gevent"), hello("gunicorn-gevent")
    checks.append(
        Check(
            "chaussette-gevent vs gunicorn-gevent, hello",
            ">= 1.4x",
            _ratio(a, b),
            None if a is None or not b else a / b >= 1.4,
        )
    )
    fastest = max(
        ((hello(r.target.name), r.target.name) for r in results if r.target.kind == "chaussette"),
        key=lambda x: x[0] or 0,
        default=(None, ""),
    )
    g = hello("granian")
    measured = f"{_ratio(fastest[0], g)} ({fastest[1]})" if fastest[0] and g else "-"
    ours, theirs = by_name.get(fastest[1]), by_name.get("granian")
    if fastest[0] and g and ours and theirs:
        a, b = ours.median("hello", "cpu_us"), theirs.median("hello", "cpu_us")
        if a and b:  # what a response costs each, a figure that moves less than req/s
            measured += f"; server CPU per request: granian {b:.1f} µs, {fastest[1]} {a:.1f} µs"
    checks.append(
        Check(
            "fastest chaussette backend vs granian, hello",
            ">= 1.5x",
            measured,
            None if fastest[0] is None or not g else fastest[0] / g >= 1.5,
        )
    )
    start = statistics.median(launch.startups) if launch.startups else None
    checks.append(
        Check(
            "chaussette startup, spawn to first 200",
            "< 0.5 s",
            f"{start:.3f} s (max {max(launch.startups):.3f} s)" if start is not None else "-",
            None if start is None else start < 0.5,
        )
    )
    rss = statistics.median(launch.idle_rss) if launch.idle_rss else None
    checks.append(
        Check(
            "idle RSS of chaussette --backend wsgiref",
            "< 30 MB",
            _mb(rss),
            None if rss is None else rss < 30 * MB,
        )
    )
    return checks


def check_rows(checks: list[Check]) -> list[list[str]]:
    met = {True: "yes", False: "NO", None: "not measured"}
    return [["target", "goal", "measured", "met"]] + [
        [c.target, c.goal, c.measured, met[c.met]] for c in checks
    ]


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _program_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def environment(opts: Options) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dists = [
        "chaussette",
        "gevent",
        "greenlet",
        "waitress",
        "eventlet",
        "tornado",
        "bjoern",
        "meinheld",
        "gevent-websocket",
        "ws4py",
        "python-socketio",
        "gunicorn",
        "granian",
    ]
    versions = ", ".join(f"{d} {v}" for d in dists if (v := _version(d)))
    pin = (
        f"server on core {opts.server_cpu}, wrk on core {opts.client_cpu}"
        if opts.server_cpu is not None
        else "not pinned"
    )
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "peers": f"{_program_version(['nginx', '-v'])}; {_program_version(['wrk', '-v'])}",
        "method": (
            f"{pin}; wrk -t1 -c{opts.connections} -d{opts.duration}s --timeout 2s; "
            f"{opts.warmup} s warm-up per scenario (not counted); median of {opts.runs} "
            f"interleaved round(s), each server started afresh every round, a chaussette row "
            f"and its native row side by side (scenario by scenario, who goes first "
            f"alternating); vs native = median of the per-round ratios; CPU/req = the "
            f"server's CPU time (all processes and threads) over its responses"
        ),
    }


@dataclass
class Block:
    """A piece of the report: a heading (title), a list (items) or a table (title, rows)."""

    title: str = ""
    items: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def report(
    results: list[Result],
    skipped: list[Target],
    launch: Launch,
    opts: Options,
    env: dict[str, str],
    interrupted: bool,
) -> tuple[list[Block], list[Check]]:
    """The report as blocks (rendered as markdown and reStructuredText), and the targets."""
    facts = [f"{key}: {value}" for key, value in env.items()]
    if interrupted:
        facts.append("INTERRUPTED: fewer rounds than asked")
    blocks = [Block(items=facts)]
    for i, scenario in enumerate(opts.scenarios):
        rows = scenario_rows(results, scenario, with_startup=i == 0)
        blocks.append(Block(scenario.title, rows=rows))
    launch_rows = [
        ["chaussette alone", "median", "runs"],
        [
            "spawn to first 200",
            f"{statistics.median(launch.startups):.3f} s" if launch.startups else "-",
            str(len(launch.startups)),
        ],
        [
            "idle RSS, --backend wsgiref",
            _mb(statistics.median(launch.idle_rss)) if launch.idle_rss else "-",
            str(len(launch.idle_rss)),
        ],
    ]
    blocks.append(Block("Startup and idle memory", rows=launch_rows))
    if launch.failures:
        blocks.append(Block(items=[f"chaussette alone failed: {x}" for x in launch.failures]))
    checks = check_targets(results, launch)
    blocks.append(Block("Targets", rows=check_rows(checks)))
    if skipped:
        blocks += [Block("Skipped"), Block(items=[f"{t.name}: {t.skip}" for t in skipped])]
    blocks.append(Block("What each row is"))
    blocks.append(Block(items=[f"{r.target.name}: {r.target.note}" for r in results]))
    return blocks, checks


def to_markdown(blocks: list[Block], title: str) -> str:
    out = [f"## {title}"]
    for block in blocks:
        if block.title:
            out += ["", f"### {block.title}"]
        if block.rows:
            out += ["", markdown_table(block.rows)]
        if block.items:
            out += ["", *(f"- {x}" for x in block.items)]
    return "\n".join(out) + "\n"


def to_rst(blocks: list[Block]) -> str:
    """Tables and lists only, headings as rubrics: the text can be included anywhere."""
    out = []
    for block in blocks:
        if block.rows:
            out += ["", rst_table(block.rows, block.title)]
        elif block.title:
            out += ["", f".. rubric:: {_rst(block.title)}"]
        if block.items:
            out += ["", *(f"- {_rst(x)}" for x in block.items)]
    return "\n".join(out).lstrip() + "\n"


COLORS = {
    "chaussette": "#1f77b4",
    "native": "#9e9e9e",
    "gunicorn": "#ff7f0e",
    "granian": "#2ca02c",
    "nginx": "#333333",
}


def chart(results: list[Result], opts: Options, path: Path, title: str) -> str | None:
    """A horizontal bar chart of req/s per scenario; returns why not when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib not installed: pip install matplotlib"
    measured = [r for r in results if any(r.samples.values())]
    if not measured:
        return "nothing measured"
    height = 1.6 + 0.28 * len(measured)
    fig, axes = plt.subplots(
        1, len(opts.scenarios), figsize=(5 * len(opts.scenarios), height), sharey=True
    )
    if len(opts.scenarios) == 1:
        axes = [axes]
    names = [r.target.name for r in measured][::-1]
    for ax, scenario in zip(axes, opts.scenarios, strict=True):
        values = [r.median(scenario.name, "rps") or 0 for r in measured][::-1]
        colors = [COLORS.get(r.target.kind, "#000000") for r in measured][::-1]
        bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=7)
        ax.set_title(scenario.title.split(":")[0], fontsize=10)
        ax.set_xlabel("requests/s (median)")
        ax.margins(x=0.25)
        ax.tick_params(axis="y", labelsize=8)
    kinds = list(dict.fromkeys(r.target.kind for r in measured))
    handles = [Patch(color=COLORS.get(k, "#000000"), label=k) for k in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=len(kinds), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- the command line --------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.http",
        description="wrk against every chaussette http backend, the same libraries run by "
        "themselves, gunicorn, granian and nginx (the ceiling). Not a test: numbers only.",
    )
    p.add_argument("--duration", type=int, help="seconds of each measured wrk run (default 3)")
    p.add_argument("--runs", type=int, help="rounds; the table shows medians (default 5)")
    p.add_argument("--warmup", type=int, help="seconds of wrk before each measured run (def. 1)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="only these rows (globs like 'chaussette-*'); the native rows they compare "
        "with and nginx are added",
    )
    p.add_argument(
        "--scenario",
        nargs="+",
        choices=[s.name for s in SCENARIOS],
        help="only these scenarios (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 s, no warm-up")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--server-cpu", type=int, default=0, help="core for the server (default 0)")
    p.add_argument("--client-cpu", type=int, default=1, help="core for wrk (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin (fewer than 2 cores)")
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="where results.md, results.rst, results.json and http.png go (default bench/results)",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="also write the docs' copy: docs/benchmarks-results.inc and "
        "docs/benchmarks-http.png (not with --quick)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.docs and args.quick:
        p.error("--docs records a full run: not with --quick")
    quick = args.quick
    args.duration = args.duration or (1 if quick else 3)
    args.runs = args.runs or (1 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    for name in ("duration", "runs", "connections"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    return args


DOCS_INCLUDE = ROOT / "docs" / "benchmarks-results.inc"
DOCS_CHART = ROOT / "docs" / "benchmarks-http.png"


def write_outputs(
    blocks: list[Block],
    checks: list[Check],
    results: list[Result],
    skipped: list[Target],
    launch: Launch,
    opts: Options,
    env: dict[str, str],
    out: Path,
    docs: bool,
) -> str:
    """results.md/.rst/.json and http.png in ``out`` (and the docs' copy); the markdown."""
    md = to_markdown(blocks, f"HTTP benchmark, {env['date']}")
    rst = to_rst(blocks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.rst").write_text(rst)
    raw = {
        "environment": env,
        "results": [
            {
                "name": r.target.name,
                "kind": r.target.kind,
                "native": r.target.native,
                "startups": r.startups,
                "failed": r.failed,
                "failures": r.failures,
                "samples": {k: [asdict(s) for s in v] for k, v in r.samples.items()},
            }
            for r in results
        ],
        "skipped": {t.name: t.skip for t in skipped},
        "launch": asdict(launch),
        "targets": [asdict(c) for c in checks],
    }
    (out / "results.json").write_text(json.dumps(raw, indent=2) + "\n")
    why_not = chart(results, opts, out / "http.png", f"chaussette HTTP benchmark, {env['date']}")
    written = [f"{out}/results.md", "results.rst", "results.json"]
    written.append("http.png" if why_not is None else f"(no chart: {why_not})")
    if docs:
        image = ""
        if why_not is None:
            shutil.copyfile(out / "http.png", DOCS_CHART)
            image = f".. image:: {DOCS_CHART.name}\n   :alt: requests per second, per server\n\n"
        DOCS_INCLUDE.write_text(
            ".. Written by ``python -m bench.http --docs``: the next full run replaces it.\n\n"
            + image
            + rst
        )
        written.append(str(DOCS_INCLUDE))
    return md + "\nwritten: " + ", ".join(written)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def pin_cores(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(server core, wrk core); this process moves to wrk's, off the server's."""
    if args.no_pin:
        return None, None
    cpus = os.sched_getaffinity(0)
    if args.server_cpu == args.client_cpu or not {args.server_cpu, args.client_cpu} <= cpus:
        raise SystemExit(
            f"bench: --server-cpu and --client-cpu must be two of {sorted(cpus)} (or --no-pin)"
        )
    os.sched_setaffinity(0, {args.client_cpu})
    return args.server_cpu, args.client_cpu


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = build_targets()
    if args.only:
        targets = select(targets, args.only)
    runnable = [t for t in targets if t.skip is None]
    skipped = [t for t in targets if t.skip is not None]
    scenarios = tuple(s for s in SCENARIOS if not args.scenario or s.name in args.scenario)
    per_start = len(scenarios) * (args.warmup + args.duration) + 2
    estimate = args.runs * (len(runnable) * per_start + 3)
    if args.list:
        for t in targets:
            print(f"{t.name:28} {'SKIP: ' + t.skip if t.skip else t.note}")
        print(f"\n{len(runnable)} servers; about {estimate / 60:.0f} min with these options")
        return 0
    missing = [p for p in ("wrk", "taskset") if not shutil.which(p)]
    if missing:
        print(f"bench: {', '.join(missing)} not found (apt-get install wrk util-linux)")
        return 2
    server_cpu, client_cpu = pin_cores(args)
    # A SIGTERM ends the run like Ctrl-C: the running server is stopped, the rounds done
    # are reported. (The servers run in sessions of their own: no signal reaches them.)
    signal.signal(signal.SIGTERM, _interrupt)
    opts = Options(
        duration=args.duration,
        warmup=args.warmup,
        runs=args.runs,
        connections=args.connections,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        scenarios=scenarios,
    )
    print(
        f"bench: {len(runnable)} servers x {len(scenarios)} scenarios x {args.runs} rounds, "
        f"about {estimate / 60:.1f} min; skipped: {len(skipped)}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="chaussette-bench-") as tmp:
        scratch = Path(tmp)
        for scenario in scenarios:
            script = scratch / f"{scenario.name}.lua"
            script.write_text(wrk_script(scenario))
            opts.scripts[scenario.name] = script
        env = environment(opts)
        results, launch, interrupted = run_all(runnable, opts, scratch, args.quiet)
    blocks, checks = report(results, skipped, launch, opts, env, interrupted)
    summary = write_outputs(
        blocks, checks, results, skipped, launch, opts, env, args.out, args.docs
    )
    print()
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
