"""FastCGI benchmark: wrk -> nginx -> a FastCGI server, against the other ways to get there.

    python -m bench.fastcgi --list      the rows, what is skipped and why
    python -m bench.fastcgi --quick     a smoke run (one round of 1 s)
    python -m bench.fastcgi             the full run (5 rounds of 3 s)
    python -m bench.fastcgi --profile chaussette-fastcgi-threads   where its time goes

Every row is nginx (one worker) in front of one server process serving ``bench.apps:app``
(the hello app), except ``nginx-return-200``, nginx answering by itself: the ceiling of
this machine for this path. The server is pinned to one core, nginx and wrk to the other;
each round starts every row afresh, in an order rotated each round, warms it up, then runs
wrk once; the table gives the medians of the rounds. The HTTP rows are chaussette's http
backends behind ``proxy_pass`` (upstream keep-alive), so "vs HTTP" answers: what does
FastCGI cost or save against the fastest HTTP server chaussette can run behind nginx?

The measuring machinery (pinning, wrk and its Lua summary, RSS sampling, medians, tables,
chart) is bench/http.py's; this file adds the rows, nginx's configuration, the two
reference FastCGI servers' runners and the report. bench/README.md explains the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import http as hb
from bench.http import (
    HOST,
    Block,
    Options,
    Result,
    Scenario,
    Server,
    StartFailed,
    Target,
    free_port,
    markdown_table,
    probe,
    run_wrk,
    to_markdown,
    to_rst,
    wrk_script,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = "bench.apps:app"
HELLO = Scenario("hello", "hello through nginx: GET / (22-byte body)", "/")
UPSTREAM_KEEPALIVE = 64  # idle connections nginx keeps to the server: more than wrk's 50
REFERENCES = ("gevent-fastcgi", "flup")
DOCS_INCLUDE = ROOT / "docs" / "benchmarks-fastcgi.inc"
DOCS_CHART = ROOT / "docs" / "benchmarks-fastcgi.png"
STOP_TIMEOUT = 10.0

# -- the reference servers, run by ``python -m bench.fastcgi --serve NAME HOST PORT`` -------


def serve_gevent_fastcgi(host: str, port: int) -> None:
    """gevent-fastcgi's WSGIServer, one process (one core). It sets TCP_NODELAY itself;
    its ``buffer_size`` (default 1 KiB) is both the socket buffers it forces and its read
    size: 64 KiB here, which measured best (1 KiB is what its default costs)."""
    from gevent_fastcgi.wsgi import WSGIServer

    from bench.apps import app

    WSGIServer((host, port), app, buffer_size=65536, num_workers=1).serve_forever()


def serve_flup(host: str, port: int) -> None:
    """flup's threaded FastCGI WSGIServer (its multi-threaded mode: the one a single
    process can serve 50 nginx connections with), plus the TCP_NODELAY flup never sets:
    it writes each record's header, content and padding in three sends, and without it
    every keep-alive response stalls on Nagle."""
    from flup.server import fcgi_base
    from flup.server.fcgi import WSGIServer

    from bench.apps import app

    class NoDelayConnection(fcgi_base.Connection):  # type: ignore[misc]
        def __init__(self, sock: socket.socket, *args: object) -> None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().__init__(sock, *args)

    server = WSGIServer(app, bindAddress=(host, port), maxThreads=64)
    server._connectionClass = NoDelayConnection
    server._jobClass = NoDelayConnection
    server.run()


SERVE = {"gevent-fastcgi": serve_gevent_fastcgi, "flup": serve_flup}


# -- the rows --------------------------------------------------------------------------------


@dataclass
class Row(Target):
    upstream: str = "fastcgi"  # how nginx reaches the server: fastcgi, http or none


def _chaussette(protocol: str, backend: str) -> hb.Command:
    def command(port: int, scratch: Path) -> list[str]:
        argv = [*hb.chaussette_argv(), "--protocol", protocol, "--backend", backend]
        return [*argv, "--host", HOST, "--port", str(port), APP]

    return command


def _reference(name: str) -> hb.Command:
    def command(port: int, scratch: Path) -> list[str]:
        return [sys.executable, "-m", "bench.fastcgi", "--serve", name, HOST, str(port)]

    return command


def _installed(protocol: str, backend: str) -> str | None:
    """Why chaussette cannot run this pair here, or None."""
    from chaussette.backends import registry

    for info in registry.all_backends():
        if (info.protocol, info.name) == (protocol, backend):
            missing = info.missing()
            return f"needs {', '.join(missing)}: {registry.install_hint(info)}" if missing else None
    return f"chaussette has no --protocol {protocol} --backend {backend} yet"


def build_rows() -> list[Row]:
    rows = []
    for engine in ("threads", "gevent", "eventlet"):
        rows.append(
            Row(
                f"chaussette-fastcgi-{engine}",
                "chaussette",
                _chaussette("fastcgi", engine),
                skip=_installed("fastcgi", engine),
                note=f"chaussette --protocol fastcgi --backend {engine} (defaults)",
            )
        )
    rows.append(
        Row(
            "gevent-fastcgi",
            "reference",
            _reference("gevent-fastcgi"),
            skip=hb._missing("gevent_fastcgi"),
            note="gevent_fastcgi.wsgi.WSGIServer, num_workers=1, buffer_size=65536 "
            "(TCP_NODELAY is its own)",
        )
    )
    rows.append(
        Row(
            "flup",
            "reference",
            _reference("flup"),
            skip=hb._missing("flup"),
            note="flup.server.fcgi.WSGIServer (threaded), TCP_NODELAY added",
        )
    )
    for backend in ("bjoern", "meinheld", "fastgevent"):
        rows.append(
            Row(
                f"http-{backend}",
                "http",
                _chaussette("http", backend),
                skip=_installed("http", backend),
                note=f"chaussette --backend {backend} behind proxy_pass (HTTP/1.1 keep-alive)",
                upstream="http",
            )
        )
    rows.append(
        Row(
            "nginx-return-200",
            "nginx",
            None,
            skip=None if shutil.which("nginx") else "nginx not found (apt-get install nginx)",
            note="nginx answers itself: the ceiling (nginx and wrk on the same core as always)",
            upstream="none",
        )
    )
    return rows


def select_rows(rows: list[Row], patterns: Sequence[str]) -> list[Row]:
    """The rows ``--only`` names, plus what the ratios need: the references, the HTTP
    rows and the ceiling."""
    import fnmatch

    unknown = [p for p in patterns if not any(fnmatch.fnmatch(r.name, p) for r in rows)]
    if unknown:
        names = " ".join(r.name for r in rows)
        raise SystemExit(f"--only {' '.join(unknown)}: no such row; choose from {names}")
    return [
        r
        for r in rows
        if r.kind != "chaussette" or any(fnmatch.fnmatch(r.name, p) for p in patterns)
    ]


# -- nginx -----------------------------------------------------------------------------------


def nginx_conf(prefix: Path, port: int, row: Row, backend_port: int) -> str:
    temps = " ".join(
        f"{kind}_temp_path {prefix}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    upstream = (
        f"upstream backend {{ server {HOST}:{backend_port}; keepalive {UPSTREAM_KEEPALIVE}; }}"
    )
    if row.upstream == "fastcgi":
        location = (
            "include /etc/nginx/fastcgi_params; "
            'fastcgi_param SCRIPT_NAME ""; fastcgi_param PATH_INFO $uri; '
            "fastcgi_keep_conn on; fastcgi_pass backend;"
        )
    elif row.upstream == "http":
        location = (
            'proxy_http_version 1.1; proxy_set_header Connection ""; '
            "proxy_set_header Host $host; proxy_pass http://backend;"
        )
    else:
        upstream = ""
        location = f'default_type text/plain; return 200 "{hb.HELLO_BODY.strip()}\\n";'
    return f"""
worker_processes 1;
pid {prefix}/logs/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temps}
    keepalive_requests 1000000;
    {upstream}
    server {{
        listen {HOST}:{port};
        location / {{ {location} }}
    }}
}}
"""


def start_nginx(row: Row, backend_port: int, scratch: Path, cpu: int | None) -> tuple[Server, int]:
    prefix = scratch / "nginx"
    for sub in ("conf", "logs", "tmp"):
        (prefix / sub).mkdir(parents=True)
    for path in (prefix, scratch, scratch.parent):  # nobody's workers must get through
        path.chmod(0o755)
    port = free_port()
    (prefix / "conf" / "nginx.conf").write_text(nginx_conf(prefix, port, row, backend_port))
    argv = [str(shutil.which("nginx")), "-p", f"{prefix}/", "-c", "conf/nginx.conf"]
    return Server([*argv, "-g", "daemon off;"], cpu, scratch / "nginx.log"), port


def stop(server: Server | None) -> None:
    """nginx first (its graceful QUIT), then the server behind it."""
    if server is not None:
        server.stop()


def wait_through(port: int, servers: list[Server], timeout: float = hb.READY_TIMEOUT) -> float:
    """Seconds until ``GET /`` answers 200 through nginx; StartFailed if a process dies."""
    started = time.perf_counter()
    status = None
    while time.perf_counter() - started < timeout:
        status = probe(port)
        if status == 200:
            return time.perf_counter() - started
        for server in servers:
            if not server.alive():
                raise StartFailed(f"exited ({server.proc.returncode}): {server.tail()}")
        time.sleep(0.01)
    raise StartFailed(
        f"no 200 through nginx in {timeout:.0f} s (last {status}): "
        + " / ".join(s.tail() for s in servers)
    )


# -- one round -------------------------------------------------------------------------------


@dataclass
class FcgiResult(Result):
    # CPU seconds the server (all its processes and threads) used per response, per round
    cpu: list[float] = field(default_factory=list)


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants (their
    threads included: /proc/PID/stat sums them)."""
    total = 0
    for p in hb.descendants(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _TICK


def measure(result: FcgiResult, opts: Options, scratch: Path) -> None:
    row = result.target
    assert isinstance(row, Row)
    work = Path(tempfile.mkdtemp(prefix=f"{row.name}-", dir=scratch))
    backend: Server | None = None
    nginx: Server | None = None
    try:
        backend_port = free_port()
        if row.command is not None:
            argv = row.command(backend_port, work)
            backend = Server(argv, opts.server_cpu, work / "server.log")
        nginx, port = start_nginx(row, backend_port, work, opts.client_cpu)
        watched = [s for s in (backend, nginx) if s is not None]
        try:
            result.startups.append(wait_through(port, watched))
        except StartFailed as exc:
            result.failed = f"failed to start: {exc}"
            return
        try:
            if opts.warmup:
                run_wrk(opts, HELLO, port, opts.warmup, backend or nginx)
            measured = backend or nginx
            before = tree_cpu(measured.proc.pid)
            sample = run_wrk(opts, HELLO, port, opts.duration, measured)
            used = tree_cpu(measured.proc.pid) - before
            if not all(s.alive() for s in watched):
                raise RuntimeError("a process exited: " + " / ".join(s.tail() for s in watched))
        except RuntimeError as exc:
            result.failures.setdefault(HELLO.name, []).append(str(exc))
            return
        result.samples.setdefault(HELLO.name, []).append(sample)
        result.cpu.append(used / max(sample.requests, 1))
    finally:
        stop(nginx)
        stop(backend)


def run_rounds(
    rows: list[Row], opts: Options, scratch: Path, quiet: bool
) -> tuple[list[FcgiResult], bool]:
    results = [FcgiResult(r) for r in rows]
    try:
        for round_no in range(opts.runs):
            shift = round_no % len(results)
            for result in results[shift:] + results[:shift]:
                if result.failed:
                    continue
                if not quiet:
                    print(f"  round {round_no + 1}/{opts.runs}: {result.target.name}", flush=True)
                measure(result, opts, scratch)
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
        return results, True
    return results, False


# -- the report ------------------------------------------------------------------------------


def _best(results: list[FcgiResult], kinds: Sequence[str]) -> tuple[float | None, str]:
    best: tuple[float | None, str] = (None, "-")
    for r in results:
        rps = r.median(HELLO.name, "rps")
        if r.target.kind in kinds and rps and (best[0] is None or rps > best[0]):
            best = (rps, r.target.name)
    return best


def _cpu(result: FcgiResult) -> float | None:
    """Median server CPU seconds per response."""
    return statistics.median(result.cpu) if result.cpu else None


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e6:.0f} µs"


def table(results: list[FcgiResult]) -> list[list[str]]:
    ref, ref_name = _best(results, ("reference",))
    ref_cpu = next((_cpu(r) for r in results if r.target.name == ref_name), None)
    http, http_name = _best(results, ("http",))
    ceiling, _ = _best(results, ("nginx",))
    rows = [
        [
            "row",
            "req/s",
            "±",
            "p99",
            "server CPU/resp",
            f"CPU vs {ref_name}",
            "server RSS",
            f"vs {ref_name}",
            f"vs {http_name}",
            "vs nginx alone",
            "errors",
        ]
    ]
    for r in results:
        rps = r.median(HELLO.name, "rps")
        if rps is None:
            why = r.failed or "; ".join(r.failures.get(HELLO.name, [])) or "not measured"
            rows.append([r.target.name, f"failed: {why[:160]}"] + [""] * 9)
            continue
        samples = r.samples[HELLO.name]
        errors = sum(s.errors for s in samples)
        requests = sum(s.requests for s in samples)
        failed_runs = len(r.failures.get(HELLO.name, []))
        err = "0" if not errors else f"{errors} ({100 * errors / max(requests, 1):.1f}%)"
        if failed_runs:
            err += f"; {failed_runs} run(s) failed"
        rss = hb._mb(r.median(HELLO.name, "rss")) if r.target.kind != "nginx" else "-"
        rows.append(
            [
                r.target.name,
                hb._rps(rps),
                hb._spread([s.rps for s in samples]),
                hb._ms(r.median(HELLO.name, "p99_ms")),
                _us(_cpu(r)),
                hb._ratio(ref_cpu, _cpu(r)) if r.target.kind != "nginx" else "-",
                rss,
                hb._ratio(rps, ref),
                hb._ratio(rps, http),
                hb._ratio(rps, ceiling),
                err,
            ]
        )
    return rows


def checks(results: list[FcgiResult], connections: int) -> list[hb.Check]:
    ref, ref_name = _best(results, ("reference",))
    out = []
    for r in results:
        if r.target.kind != "chaussette" or r.target.name.endswith("eventlet"):
            continue
        rps, p99 = r.median(HELLO.name, "rps"), r.median(HELLO.name, "p99_ms")
        out.append(
            hb.Check(
                f"{r.target.name} vs the best of gevent-fastcgi and flup ({ref_name})",
                ">= 2x",
                hb._ratio(rps, ref),
                None if rps is None or not ref else rps / ref >= 2,
            )
        )
        out.append(
            hb.Check(
                f"{r.target.name} p99 at {connections} connections",
                "< 20 ms",
                hb._ms(p99),
                None if p99 is None else p99 < 20,
            )
        )
        ref_cpu = next((_cpu(x) for x in results if x.target.name == ref_name), None)
        cpu = _cpu(r)
        out.append(
            hb.Check(
                f"{r.target.name}: server CPU per response, {ref_name}'s over its own "
                "(less sensitive to a busy machine than req/s; not a stated target)",
                ">= 2x",
                hb._ratio(ref_cpu, cpu),
                None if cpu is None or ref_cpu is None else ref_cpu / cpu >= 2,
            )
        )
    return out


def environment(opts: Options) -> dict[str, str]:
    env = hb.environment(opts)
    dists = ["chaussette", "gevent", "greenlet", "eventlet", "bjoern", "meinheld", "flup"]
    dists.append("gevent-fastcgi")
    env["versions"] = ", ".join(f"{d} {v}" for d in dists if (v := hb._version(d)))
    pin = (
        f"server on core {opts.server_cpu}; nginx (1 worker) and wrk on core {opts.client_cpu}"
        if opts.server_cpu is not None
        else "not pinned"
    )
    env["method"] = (
        f"{pin}; wrk -t1 -c{opts.connections} -d{opts.duration}s --timeout 2s -> nginx -> "
        f"server, upstream keepalive {UPSTREAM_KEEPALIVE}; {opts.warmup} s warm-up (not "
        f"counted); median of {opts.runs} interleaved round(s), every process started afresh "
        "each round"
    )
    return env


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def report(
    results: list[FcgiResult], skipped: list[Row], opts: Options, interrupted: bool, load: str
) -> tuple[list[Block], list[hb.Check], dict[str, str]]:
    env = environment(opts)
    env["load"] = f"load average (1, 5, 15 min) {load} at the start, {_load()} at the end"
    facts = [f"{k}: {v}" for k, v in env.items()]
    if interrupted:
        facts.append("INTERRUPTED: fewer rounds than asked")
    found = checks(results, opts.connections)
    blocks = [
        Block(items=facts),
        Block(HELLO.title, rows=table(results)),
        Block("Targets", rows=hb.check_rows(found)),
    ]
    if skipped:
        blocks += [Block("Skipped"), Block(items=[f"{r.name}: {r.skip}" for r in skipped])]
    blocks += [Block("What each row is")]
    blocks.append(Block(items=[f"{r.target.name}: {r.target.note}" for r in results]))
    return blocks, found, env


def write_outputs(
    blocks: list[Block],
    found: list[hb.Check],
    results: list[FcgiResult],
    skipped: list[Row],
    opts: Options,
    env: dict[str, str],
    out: Path,
    docs: bool,
) -> str:
    md = to_markdown(blocks, f"FastCGI benchmark, {env['date']}")
    rst = to_rst(blocks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fastcgi.md").write_text(md)
    (out / "fastcgi.rst").write_text(rst)
    raw = {
        "environment": env,
        "results": [
            {
                "name": r.target.name,
                "kind": r.target.kind,
                "startups": r.startups,
                "failed": r.failed,
                "failures": r.failures,
                "samples": {k: [asdict(s) for s in v] for k, v in r.samples.items()},
                "cpu_per_response": r.cpu,
            }
            for r in results
        ],
        "skipped": {r.name: r.skip for r in skipped},
        "targets": [asdict(c) for c in found],
    }
    (out / "fastcgi.json").write_text(json.dumps(raw, indent=2) + "\n")
    # bench/http.py colours its bars by row kind; these kinds are this benchmark's own.
    hb.COLORS.update({"reference": "#9e9e9e", "http": "#2ca02c"})
    png = out / "fastcgi.png"
    plain: list[Result] = list(results)
    why_not = hb.chart(plain, opts, png, f"wrk -> nginx -> server, {env['date']}")
    written = [f"{out}/fastcgi.md", "fastcgi.rst", "fastcgi.json"]
    written.append(png.name if why_not is None else f"(no chart: {why_not})")
    if docs:
        image = ""
        if why_not is None:
            shutil.copyfile(png, DOCS_CHART)
            image = f".. image:: {DOCS_CHART.name}\n   :alt: requests per second through nginx\n\n"
        DOCS_INCLUDE.write_text(
            ".. Written by ``python -m bench.fastcgi --docs``: the next full run replaces it.\n\n"
            + image
            + rst
        )
        written.append(str(DOCS_INCLUDE))
    return md + "\nwritten: " + ", ".join(written)


# -- profiling -------------------------------------------------------------------------------


def profile(row: Row, opts: Options, scratch: Path, seconds: int, out: Path) -> int:
    """Run ``row`` under wrk with py-spy recording the server; print the hottest frames."""
    spy = hb._script("py-spy")
    if spy is None:
        print("bench: py-spy not found (pip install py-spy)")
        return 2
    if row.command is None:
        print(f"bench: {row.name} has no Python server to profile")
        return 2
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=scratch))
    backend_port = free_port()
    backend = Server(row.command(backend_port, work), opts.server_cpu, work / "server.log")
    nginx, port = start_nginx(row, backend_port, work, opts.client_cpu)
    try:
        wait_through(port, [backend, nginx])
        run_wrk(opts, HELLO, port, 1, backend)
        out.mkdir(parents=True, exist_ok=True)
        raw = out / f"profile-{row.name}.txt"
        argv = [spy, "record", "--pid", str(backend.proc.pid), "--duration", str(seconds)]
        argv += ["--rate", "250", "--gil", "--nonblocking", "--format", "raw", "-o", str(raw)]
        pin = ["taskset", "-c", str(opts.client_cpu)] if opts.client_cpu is not None else []
        with open(work / "spy.log", "wb") as log:
            spy_proc = subprocess.Popen([*pin, *argv], stdout=log, stderr=log)
            time.sleep(0.3)  # attached before the load starts
            sample = run_wrk(opts, HELLO, port, seconds, backend)
            spy_proc.wait(seconds + 30)
        if not raw.exists():
            print(f"bench: py-spy wrote nothing: {(work / 'spy.log').read_text()[-500:]}")
            return 1
        print(f"{row.name} under py-spy: {sample.rps:,.0f} req/s, p99 {sample.p99_ms:.2f} ms")
        print(summarize_raw(raw))
        print(f"written: {raw} (collapsed stacks: flamegraph.pl or speedscope read them)")
        return 0
    finally:
        stop(nginx)
        stop(backend)


def summarize_raw(path: Path, top: int = 25) -> str:
    """Self and inclusive share of samples per function, from py-spy's collapsed stacks."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + n
    if not total:
        return "(no samples)"
    rows = [["self", "incl.", "function (file:line)"]]
    for frame, n in sorted(self_counts.items(), key=lambda x: -x[1])[:top]:
        rows.append([f"{100 * n / total:.1f}%", f"{100 * incl_counts[frame] / total:.1f}%", frame])
    rows2 = [["incl.", "function (file:line)"]]
    for frame, n in sorted(incl_counts.items(), key=lambda x: -x[1])[:top]:
        rows2.append([f"{100 * n / total:.1f}%", frame])
    return (
        f"{total} samples\n\nBy own time:\n\n{markdown_table(rows)}\n\n"
        f"Inclusive (the function and what it calls):\n\n{markdown_table(rows2)}"
    )


# -- the command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fastcgi",
        description="wrk -> nginx -> chaussette's FastCGI servers, gevent-fastcgi, flup, "
        "chaussette's HTTP backends (proxy_pass) and nginx alone. Not a test: numbers only.",
    )
    p.add_argument("--duration", type=int, help="seconds of each measured wrk run (default 3)")
    p.add_argument("--runs", type=int, help="rounds; the table shows medians (default 5)")
    p.add_argument("--warmup", type=int, help="seconds of wrk before each measured run (def. 1)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="only these chaussette rows (globs); the reference, HTTP and nginx rows stay",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 s, no warm-up")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--server-cpu", type=int, default=0, help="core for the server (default 0)")
    p.add_argument("--client-cpu", type=int, default=1, help="core for nginx+wrk (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin (fewer than 2 cores)")
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="where fastcgi.md/.rst/.json/.png go (default bench/results)",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="also write docs/benchmarks-fastcgi.inc and docs/benchmarks-fastcgi.png",
    )
    p.add_argument(
        "--profile",
        metavar="ROW",
        help="instead of the table: run ROW under wrk with py-spy recording the server",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--serve", nargs=3, metavar=("NAME", "HOST", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.docs and args.quick:
        p.error("--docs records a full run: not with --quick")
    args.duration = args.duration or (1 if args.quick else (10 if args.profile else 3))
    args.runs = args.runs or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    for name in ("duration", "runs", "connections"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        name, host, port = args.serve
        SERVE[name](host, int(port))
        return 0
    rows = build_rows()
    if args.only:
        rows = select_rows(rows, args.only)
    runnable = [r for r in rows if r.skip is None]
    skipped = [r for r in rows if r.skip is not None]
    estimate = args.runs * len(runnable) * (args.warmup + args.duration + 2)
    if args.list:
        for r in rows:
            print(f"{r.name:28} {'SKIP: ' + r.skip if r.skip else r.note}")
        print(f"\n{len(runnable)} rows; about {estimate / 60:.1f} min with these options")
        return 0
    missing = [x for x in ("wrk", "taskset", "nginx") if not shutil.which(x)]
    if missing:
        print(f"bench: {', '.join(missing)} not found (apt-get install wrk util-linux nginx)")
        return 2
    server_cpu, client_cpu = hb.pin_cores(args)
    signal.signal(signal.SIGTERM, hb._interrupt)
    opts = Options(
        duration=args.duration,
        warmup=args.warmup,
        runs=args.runs,
        connections=args.connections,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        scenarios=(HELLO,),
    )
    with tempfile.TemporaryDirectory(prefix="chaussette-fcgi-bench-") as tmp:
        scratch = Path(tmp)
        script = scratch / "hello.lua"
        script.write_text(wrk_script(HELLO))
        opts.scripts[HELLO.name] = script
        if args.profile:
            chosen = [r for r in runnable if r.name == args.profile]
            if not chosen:
                raise SystemExit(
                    f"--profile {args.profile}: choose from "
                    + " ".join(r.name for r in runnable if r.command)
                )
            return profile(chosen[0], opts, scratch, args.duration, args.out)
        print(
            f"bench: {len(runnable)} rows x {args.runs} rounds, about {estimate / 60:.1f} min; "
            f"skipped: {len(skipped)}; server on core {server_cpu}, nginx+wrk on core "
            f"{client_cpu}",
            flush=True,
        )
        load = _load()
        results, interrupted = run_rounds(runnable, opts, scratch, args.quiet)
    blocks, found, env = report(results, skipped, opts, interrupted, load)
    print()
    print(write_outputs(blocks, found, results, skipped, opts, env, args.out, args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
