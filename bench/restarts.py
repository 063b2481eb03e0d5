"""Restart benchmark: wrk for 30 s while a real process manager restarts the workers every 3 s.

    python -m bench.restarts --list      the rows, what is skipped and why, how long
    python -m bench.restarts --quick --only gevent-circus-restart    a smoke run (10 s a row)
    python -m bench.restarts             the full run (its length is printed first)
    python -m bench.restarts --docs      the full run, and the table in docs/restarts.rst

Not a test: nothing passes or fails. Every row runs two chaussette workers under real
``circusd`` or real ``supervisord``, configured from the shipped examples/circus.ini and
examples/supervisor.conf (through tests/managers.py, which the manager tests use too), with
wrk on the manager's socket (or on nginx, for FastCGI). While wrk runs, the harness restarts
the workers every ``--every`` seconds the way an operator would:

- ``circus-restart``: ``circusctl restart web --waiting`` (stop both, start both; Circus
  keeps the socket open, new connections wait in its queue);
- ``circus-reload``: ``circusctl reload web --waiting`` (new processes first, then the old
  ones are stopped);
- ``supervisor-rolling``: ``supervisorctl restart web:web_0``, wait until the new process
  answers, then the same for ``web:web_1`` (``restart web:*`` would close the socket);
- ``supervisor-hup``: ``supervisorctl signal HUP web:*``: each worker drains and re-executes
  itself in place, on the same socket, with the same pid;
- ``...-killed``: the contrast, workers killed instead of drained: Circus with
  ``circusctl set web stop_signal KILL`` (then ``restart web``), Supervisor with
  ``supervisorctl signal KILL web:web_0`` (``autorestart`` starts a new one; wait until it
  answers; then ``web:web_1``). What a server that cannot drain costs, and what the drain
  saves.

The table gives what wrk saw: requests, socket errors by kind, HTTP errors, p99 and max
latency, and how many restarts were done. bench/README.md ("Restarts") explains the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import fastcgi as fb
from bench import http as hb
from chaussette.backends import registry
from tests import managers
from tests.conftest import Proc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS_PAGE = ROOT / "docs" / "restarts.rst"
DOCS_START = ".. restarts-table-start: written by python -m bench.restarts --docs"
DOCS_END = ".. restarts-table-end"
WRK_TIMEOUT = 10  # seconds: a request waiting through a restart is slow, not failed
STOP_TIMEOUT = 60.0

# wrk calls done() once at the end; the JSON line it prints is all the harness reads.
WRK_SCRIPT = """-- written by bench/restarts.py
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESTARTS-JSON {\\"requests\\": %.0f, \\"duration_us\\": %.0f, \\"connect\\": %.0f, "
    .. "\\"read\\": %.0f, \\"write\\": %.0f, \\"status\\": %.0f, \\"timeout\\": %.0f, "
    .. "\\"p50_us\\": %.0f, \\"p99_us\\": %.0f, \\"max_us\\": %.0f}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# -- the rows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    manager: str  # circus or supervisor
    action: str  # restart, reload or rolling
    drain: bool
    title: str


MODES = (
    Mode("circus-restart", "circus", "restart", True, "circusctl restart web --waiting"),
    Mode("circus-reload", "circus", "reload", True, "circusctl reload web --waiting"),
    Mode(
        "supervisor-rolling",
        "supervisor",
        "rolling",
        True,
        "supervisorctl restart web:web_0, then web:web_1",
    ),
    Mode(
        "supervisor-hup",
        "supervisor",
        "hup",
        True,
        "supervisorctl signal HUP web:* (each drains, then re-executes itself in place)",
    ),
    Mode(
        "circus-restart-killed",
        "circus",
        "restart",
        False,
        "circusctl set web stop_signal KILL, then circusctl restart web --waiting",
    ),
    Mode(
        "supervisor-rolling-killed",
        "supervisor",
        "rolling",
        False,
        "supervisorctl signal KILL web:web_0, autorestart, wait until the new one answers; "
        "then web:web_1",
    ),
)


@dataclass
class Row:
    name: str  # what --only matches: BACKEND-MODE
    server: str  # gevent, or fastcgi-threads
    options: str  # chaussette options before the app
    mode: Mode
    skip: str | None = None
    nginx: bool = False  # wrk -> nginx (fastcgi_pass, upstream keep-alive) -> the socket


def build_rows() -> list[Row]:
    """Every drain-capable HTTP backend under every mode, then FastCGI (threads) behind
    nginx under Circus (supervisor's rolling restart checks each new process over HTTP)."""
    rows: list[Row] = []
    for info in registry.all_backends():
        if info.protocol != "http" or not info.drain:
            continue
        missing = info.missing()
        skip = f"needs {', '.join(missing)}: {registry.install_hint(info)}" if missing else None
        for mode in MODES:
            rows.append(
                Row(f"{info.name}-{mode.name}", info.name, f"--backend {info.name}", mode, skip)
            )
    nginx = None if shutil.which("nginx") else "nginx not found (apt-get install nginx)"
    for mode in MODES:
        if mode.manager == "circus":
            rows.append(
                Row(
                    f"fastcgi-threads-{mode.name}",
                    "fastcgi-threads",
                    "--protocol fastcgi --backend threads",
                    mode,
                    nginx,
                    nginx=True,
                )
            )
    return rows


def select(rows: list[Row], patterns: Sequence[str]) -> list[Row]:
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(r.name, p) for r in rows)]
    if unknown:
        names = " ".join(r.name for r in rows)
        raise SystemExit(f"--only {' '.join(unknown)}: no such row; choose from {names}")
    return [r for r in rows if any(fnmatch.fnmatch(r.name, p) for p in patterns)]


# -- the managers (tests/managers.py), pinned ------------------------------------------------


class PinnedProcs:
    """What tests/managers.py asks of the test suite's ``procs`` fixture (``start(argv)``
    returning a ``Proc``), with the process pinned to ``cpu``: the manager and the workers
    it forks inherit the affinity."""

    def __init__(self, cpu: int | None, log_dir: Path) -> None:
        self.cpu = cpu
        self.log_dir = log_dir
        self.started: list[Proc] = []

    def start(self, args: list[str]) -> Proc:
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        proc = Proc([*pin, *args], log_dir=self.log_dir)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            if proc.popen.poll() is None:
                proc.kill()
            with contextlib.suppress(OSError):
                proc._log.close()


class Managed:
    """One row's manager with its two workers: started, restarted, stopped."""

    def __init__(self, row: Row, cpu: int | None, work: Path, short: Path) -> None:
        self.row = row
        self.procs = PinnedProcs(cpu, work)
        self.workers: set[int] = set()
        self.manager: managers.Circus | managers.Supervisor
        if row.mode.manager == "circus":
            self.manager = managers.Circus(
                self.procs,
                short,
                work,
                options=row.options,
                unix=False,
                workers=self.workers,
            )
        else:
            self.manager = managers.Supervisor(
                self.procs,
                short,
                work,
                options=row.options,
                workers=self.workers,
            )
        self.port = self.manager.port

    def ready(self) -> None:
        m = self.manager
        if isinstance(m, managers.Circus):
            m.running("web", 2)
            if not self.row.mode.drain:  # Circus stops the workers with SIGKILL from now on
                out = m.ctl("set", "web", "stop_signal", "KILL")
                assert out == "ok", f"circusctl set web stop_signal KILL: {out}"
        else:
            m.running()

    def restart(self) -> None:
        m = self.manager
        if isinstance(m, managers.Circus):
            m.reload("web") if self.row.mode.action == "reload" else m.restart("web")
        elif self.row.mode.action == "hup":
            reexec_all(m)
        elif self.row.mode.drain:
            m.rolling_restart()
        else:
            for name in m.PROCESSES:
                kill_one(m, name)

    def log(self) -> str:
        return self.manager.log()

    def stop(self) -> None:
        m = self.manager
        with contextlib.suppress(Exception):
            self.workers |= {p for p in hb.descendants(m.proc.pid) if managers.is_chaussette(p)}
            if isinstance(m, managers.Circus):
                m.ctl("quit", "--waiting")
            else:
                m.ctl("shutdown")
            m.proc.wait(STOP_TIMEOUT)
        self.procs.close()
        managers.kill_workers(self.workers)


def kill_one(m: managers.Supervisor, name: str) -> None:
    """``supervisorctl signal KILL NAME``; wait until ``autorestart`` has it RUNNING under a
    new pid and that pid answers (the way ``Supervisor.restart_one`` waits)."""
    old = m.status()[name][1]
    out = m.ctl("signal", "KILL", name)
    assert "signalled" in out, f"supervisorctl signal KILL {name}: {out}"
    new = 0

    def renewed() -> bool:
        nonlocal new
        state, pid = m.status()[name]
        new = pid or 0
        return state == "RUNNING" and bool(pid) and pid != old

    managers.wait_until(renewed, f"supervisor {name} RUNNING again under a new pid", m.proc)
    managers.wait_answering(m.tcp, new, m.log)


SERVING = "): serving "  # chaussette's first log line once it serves, after each exec


def reexec_all(m: managers.Supervisor, timeout: float = 30) -> None:
    """``supervisorctl signal HUP web:*``; wait until each worker's log says it serves
    again (same pid: a re-exec, not a new process)."""
    logs = [m.logs / f"{name.split(':')[1]}.log" for name in m.PROCESSES]

    def served() -> list[int]:
        return [p.read_text(errors="replace").count(SERVING) if p.exists() else 0 for p in logs]

    before = served()
    out = m.ctl("signal", "HUP", "web:*")
    assert out.count("signalled") == len(logs), f"supervisorctl signal HUP web:*: {out}"
    deadline = time.monotonic() + timeout
    while any(a <= b for a, b in zip(served(), before, strict=True)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no re-exec within {timeout} s:\n{m.log()[-2000:]}")
        time.sleep(0.05)


# -- wrk -------------------------------------------------------------------------------------


@dataclass
class Measure:
    requests: int
    seconds: float
    connect: int
    read: int
    write: int
    timeout: int
    status: int  # answers >= 400
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def failed(self) -> int:
        return self.connect + self.read + self.write + self.timeout + self.status


def start_wrk(
    opts: hb.Options, script: Path, port: int, seconds: int, close: bool = False
) -> subprocess.Popen[bytes]:
    """wrk in the background; ``close``: one connection per request."""
    pin = ["taskset", "-c", str(opts.client_cpu)] if opts.client_cpu is not None else []
    argv = [
        *pin,
        "wrk",
        *(("-H", "Connection: close") if close else ()),
        *("-t1", f"-c{opts.connections}", f"-d{seconds}s", "--timeout", f"{WRK_TIMEOUT}s"),
        *("-s", str(script)),
        f"http://{hb.HOST}:{port}/",
    ]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def finish_wrk(wrk: subprocess.Popen[bytes], seconds: int) -> Measure:
    try:
        output = wrk.communicate(timeout=seconds + WRK_TIMEOUT + 30)[0]
    except subprocess.TimeoutExpired:
        wrk.kill()
        output = wrk.communicate()[0]
    text = output.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("RESTARTS-JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {text.strip()[-300:]}")
    r = json.loads(line.removeprefix("RESTARTS-JSON "))
    return Measure(
        requests=int(r["requests"]),
        seconds=r["duration_us"] / 1e6,
        connect=int(r["connect"]),
        read=int(r["read"]),
        write=int(r["write"]),
        timeout=int(r["timeout"]),
        status=int(r["status"]),
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000,
    )


# -- one row ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    row: Row
    measure: Measure | None = None
    restarts: list[float] = field(default_factory=list)  # seconds each restart took
    workers: int = 0  # distinct worker pids seen (2 at the start, 2 more per restart)
    failed: str | None = None


def restart_loop(
    restart: Callable[[], None], started: float, duration: int, every: float
) -> list[float]:
    """Restart at ``started + every * k`` (at once if the previous restart overran) while
    the restart can finish before wrk does; the seconds each one took."""
    took: list[float] = []
    k = 1
    while True:
        slot = max(started + every * k, time.monotonic())
        if slot - started + every > duration:
            return took
        time.sleep(max(0.0, slot - time.monotonic()))
        t = time.monotonic()
        restart()
        took.append(time.monotonic() - t)
        k += 1


def measure(
    row: Row, opts: hb.Options, every: float, scratch: Path, script: Path, close: bool = False
) -> Outcome:
    out = Outcome(row)
    work = Path(tempfile.mkdtemp(prefix=f"{row.name}-", dir=scratch))
    short = Path(tempfile.mkdtemp(prefix="chr-", dir="/tmp"))  # ipc paths < 108 bytes
    managed: Managed | None = None
    nginx: hb.Server | None = None
    try:
        managed = Managed(row, opts.server_cpu, work, short)
        managed.ready()
        port = managed.port
        if row.nginx:
            front = fb.Row(row.name, "chaussette", None, upstream="fastcgi")
            nginx, port = fb.start_nginx(front, managed.port, work, opts.client_cpu)
            fb.wait_through(port, [nginx])
            # a new worker serves once it answers through nginx (it speaks FastCGI, not HTTP)
            managed.manager.tcp = ("127.0.0.1", port)
        elif hb.probe(port) != 200:
            raise RuntimeError(f"GET / on {port} did not answer 200")
        wrk = start_wrk(opts, script, port, opts.duration, close)
        started = time.monotonic()
        try:
            out.restarts = restart_loop(managed.restart, started, opts.duration, every)
        finally:
            out.measure = finish_wrk(wrk, opts.duration)
        out.workers = len(managed.workers)
    except (
        AssertionError,
        RuntimeError,
        OSError,
        subprocess.SubprocessError,
        hb.StartFailed,
    ) as exc:
        text = " ".join(str(exc).split())
        out.failed = text[:300] or type(exc).__name__
        if managed is not None:
            (work / "manager-at-failure.log").write_text(managed.log())
    finally:
        if nginx is not None:
            nginx.stop()
        if managed is not None:
            managed.stop()
        shutil.rmtree(short, ignore_errors=True)
    return out


# -- the report ------------------------------------------------------------------------------


def table(outcomes: list[Outcome]) -> list[list[str]]:
    rows = [
        [
            "server",
            "manager, action",
            "drain",
            "restarts",
            "requests",
            "connect",
            "read",
            "write",
            "timeout",
            "HTTP >= 400",
            "failed",
            "p99",
            "max",
        ]
    ]
    for o in outcomes:
        mode = o.row.mode
        head = [o.row.server, f"{mode.manager} {mode.action}", "yes" if mode.drain else "no"]
        m = o.measure
        if m is None:
            rows.append([*head, f"failed: {o.failed or 'not measured'}"] + [""] * 9)
            continue
        failed = "0" if not m.failed else f"{m.failed} ({100 * m.failed / max(m.requests, 1):.2f}%)"
        if o.failed:
            failed += f"; {o.failed[:120]}"
        rows.append(
            [
                *head,
                str(len(o.restarts)),
                f"{m.requests:,}",
                *(str(x) for x in (m.connect, m.read, m.write, m.timeout, m.status)),
                failed,
                hb._ms(m.p99_ms),
                hb._ms(m.max_ms),
            ]
        )
    return rows


def environment(opts: hb.Options, every: float, close: bool) -> dict[str, str]:
    env = hb.environment(opts)
    dists = ["chaussette", "circus", "supervisor", "gevent", "waitress", "eventlet", "tornado"]
    dists.append("meinheld")
    env["versions"] = ", ".join(f"{d} {v}" for d in dists if (v := hb._version(d)))
    pin = (
        f"manager and workers on core {opts.server_cpu}; wrk, nginx and the ctl commands on "
        f"core {opts.client_cpu}"
        if opts.server_cpu is not None
        else "not pinned"
    )
    env["method"] = (
        f"{pin}; wrk -t1 -c{opts.connections} -d{opts.duration}s --timeout {WRK_TIMEOUT}s "
        f"({'Connection: close' if close else 'keep-alive'}) on the manager's socket "
        "(through nginx for FastCGI); 2 workers; "
        f"a restart every {every:g} s while it can finish before wrk does; the shipped "
        "examples/circus.ini and examples/supervisor.conf as they are (--graceful-timeout "
        "25, manager stop timeout 30, startsecs 1), Circus' unix-socket watcher left out; "
        "one run per row"
    )
    return env


def report(
    outcomes: list[Outcome],
    skipped: list[Row],
    opts: hb.Options,
    every: float,
    close: bool,
    interrupted: bool,
) -> tuple[list[hb.Block], dict[str, str]]:
    env = environment(opts, every, close)
    facts = [f"{k}: {v}" for k, v in env.items()]
    if interrupted:
        facts.append("INTERRUPTED: not every row was run")
    blocks = [
        hb.Block(items=facts),
        hb.Block(
            f"wrk for {opts.duration} s, workers restarted every {every:g} s", rows=table(outcomes)
        ),
    ]
    took = [
        f"{o.row.name}: {sum(o.restarts) / len(o.restarts):.1f} s" for o in outcomes if o.restarts
    ]
    if took:
        blocks += [hb.Block("Mean time a restart took"), hb.Block(items=took)]
    if skipped:
        blocks += [hb.Block("Skipped"), hb.Block(items=[f"{r.name}: {r.skip}" for r in skipped])]
    modes = {o.row.mode.name: o.row.mode.title for o in outcomes}
    blocks += [hb.Block("Actions"), hb.Block(items=[f"{k}: {v}" for k, v in modes.items()])]
    return blocks, env


def rewrite_docs(rst: str, page: Path = DOCS_PAGE) -> None:
    """Replace what lies between the two marker comments of ``page`` with ``rst``."""
    text = page.read_text()
    start, end = text.find(DOCS_START), text.find(DOCS_END)
    if start < 0 or end < start:
        raise SystemExit(f"bench: {page} lacks the markers {DOCS_START!r} ... {DOCS_END!r}")
    head = text[: start + len(DOCS_START)]
    page.write_text(f"{head}\n\n{rst.rstrip()}\n\n{text[end:]}")


def write_outputs(
    blocks: list[hb.Block],
    outcomes: list[Outcome],
    skipped: list[Row],
    env: dict[str, str],
    out: Path,
    docs: bool,
) -> str:
    md = hb.to_markdown(blocks, f"Restart benchmark, {env['date']}")
    rst = hb.to_rst(blocks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "restarts.md").write_text(md)
    (out / "restarts.rst").write_text(rst)
    raw = {
        "environment": env,
        "results": [
            {
                "name": o.row.name,
                "mode": asdict(o.row.mode),
                "measure": asdict(o.measure) if o.measure else None,
                "restarts": o.restarts,
                "workers": o.workers,
                "failed": o.failed,
            }
            for o in outcomes
        ],
        "skipped": {r.name: r.skip for r in skipped},
    }
    (out / "restarts.json").write_text(json.dumps(raw, indent=2) + "\n")
    written = [f"{out}/restarts.md", "restarts.rst", "restarts.json"]
    if docs:
        rewrite_docs(rst)
        written.append(str(DOCS_PAGE))
    return md + "\nwritten: " + ", ".join(written)


# -- the command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.restarts",
        description="wrk while Circus or Supervisor restarts chaussette's workers, for every "
        "backend that drains, beside the same runs without the drain. Not a test: numbers only.",
    )
    p.add_argument("--duration", type=int, help="seconds of wrk per row (default 30)")
    p.add_argument("--every", type=float, default=3.0, help="seconds between restarts (def. 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these rows (globs)")
    p.add_argument(
        "--close",
        action="store_true",
        help="wrk sends Connection: close (a new connection per request) instead of keep-alive",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 10 s of wrk per row")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--server-cpu", type=int, default=0, help="core for the manager (default 0)")
    p.add_argument("--client-cpu", type=int, default=1, help="core for wrk (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin (fewer than 2 cores)")
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="where restarts.md/.rst/.json go (default bench/results)",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="also rewrite the table in docs/restarts.rst (not with --quick)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.docs and args.quick:
        p.error("--docs records a full run: not with --quick")
    args.duration = args.duration or (10 if args.quick else 30)
    if args.duration < 1 or args.connections < 1:
        p.error("--duration and --connections must be at least 1")
    if args.every <= 0:
        p.error("--every must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = build_rows()
    if args.only:
        rows = select(rows, args.only)
    runnable = [r for r in rows if r.skip is None]
    skipped = [r for r in rows if r.skip is not None]
    estimate = len(runnable) * (args.duration + 6)  # + start, ready, stop
    if args.list:
        for r in rows:
            print(f"{r.name:40} {'SKIP: ' + r.skip if r.skip else r.mode.title}")
        print(f"\n{len(runnable)} rows; about {estimate / 60:.0f} min with these options")
        return 0
    missing = [x for x in ("wrk", "taskset") if not shutil.which(x)]
    if missing:
        print(f"bench: {', '.join(missing)} not found (apt-get install wrk util-linux)")
        return 2
    server_cpu, client_cpu = hb.pin_cores(args)
    signal.signal(signal.SIGTERM, hb._interrupt)
    opts = hb.Options(
        duration=args.duration,
        warmup=0,
        runs=1,
        connections=args.connections,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        scenarios=(),
    )
    print(
        f"bench: {len(runnable)} rows of {args.duration} s, about {estimate / 60:.1f} min; "
        f"skipped: {len(skipped)}",
        flush=True,
    )
    outcomes: list[Outcome] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="chaussette-restarts-") as tmp:
        scratch = Path(tmp)
        script = scratch / "restarts.lua"
        script.write_text(WRK_SCRIPT)
        try:
            for row in runnable:
                if not args.quiet:
                    print(f"  {row.name}", flush=True)
                outcome = measure(row, opts, args.every, scratch, script, args.close)
                outcomes.append(outcome)
                if not args.quiet:
                    m = outcome.measure
                    done = (
                        f"{m.requests} requests, {m.failed} failed, max {hb._ms(m.max_ms)}"
                        if m
                        else ""
                    )
                    print(f"    {len(outcome.restarts)} restarts; {done} {outcome.failed or ''}")
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: reporting what was measured", file=sys.stderr)
    blocks, env = report(outcomes, skipped, opts, args.every, args.close, interrupted)
    print()
    print(write_outputs(blocks, outcomes, skipped, env, args.out, args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
