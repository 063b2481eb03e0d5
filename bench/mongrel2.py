"""Mongrel2 benchmark: wrk -> Mongrel2 -> a handler over ZeroMQ, against its floor and ceiling.

    python -m bench.mongrel2 --list         the rows, what is skipped and why
    python -m bench.mongrel2 --quick        a smoke run (one round of 1 s)
    python -m bench.mongrel2                the full run (3 rounds of 3 s)
    python -m bench.mongrel2 --breakdown    where a request's time goes in the handler

Rows, all serving the hello response (22 bytes) of ``bench.apps:app`` through one Mongrel2:

- ``mongrel2-dir``: Mongrel2's own Dir handler serving a 22-byte file: no handler process,
  the ceiling of this machine for this path;
- ``raw-pyzmq``: a minimal pyzmq handler (``--serve-raw``): receive, split off the sender
  and connection id, publish a fixed reply; no parsing, no WSGI: the floor of Python cost;
- ``chaussette-threads``, ``chaussette-gevent``, ``chaussette-eventlet``: ``chaussette
  --protocol mongrel2 --backend ENGINE --zeromq SPEC bench.apps:app``.

Method: Mongrel2 and wrk share one core (``--client-cpu``, as nginx and wrk do in
bench/fastcgi.py), the handler has the other (``--server-cpu``). Mongrel2 runs for the whole
benchmark; each round starts every handler row afresh, in an order rotated each round,
warms it up, then runs wrk once; the table gives the medians of the rounds. CPU/req columns:
the handler's (all threads) and Mongrel2's CPU time over the responses. The measuring
machinery (pinning, wrk and its Lua summary, CPU sampling, tables) is bench/http.py's.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import http as hb
from bench.http import (
    HOST,
    Options,
    Sample,
    Scenario,
    Server,
    StartFailed,
    free_port,
    markdown_table,
    probe,
    run_wrk,
    tree_cpu_ns,
    wrk_script,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = "bench.apps:app"
SERVER_UUID = "f400bf85-4538-4f7a-8908-67e313d515c2"
HANDLER_IDENT = "34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
HELLO = Scenario("hello", "hello through Mongrel2: GET / (22-byte body)", "/")
DIR_PATH = "/static/hello.txt"
SETTLE = 0.3  # seconds the raw handler waits for Mongrel2's subscription (slow joiner)

CONF = """\
app = Handler(send_spec='tcp://127.0.0.1:{send}', send_ident='{ident}',
              recv_spec='tcp://127.0.0.1:{recv}', recv_ident='', protocol='tnetstring')
files = Dir(base='static/', index_file='hello.txt', default_ctype='text/plain')
main = Server(uuid="{uuid}", access_log="/logs/access.log", error_log="/logs/error.log",
    chroot="./", default_host="localhost", name="bench", pid_file="/run/mongrel2.pid",
    port={port}, bind_addr="127.0.0.1",
    hosts=[Host(name="localhost", routes={{'/': app, '/static/': files}})])
settings = {{"server.daemonize": 0, "upload.temp_store": "tmp/upload.XXXXXX"}}
servers = [main]
"""


# -- the minimal raw handler ---------------------------------------------------------------


def serve_raw(send_spec: str, recv_spec: str) -> None:
    """Receive, split off the sender and the connection id, publish a fixed reply."""
    import zmq

    from bench.apps import HELLO as BODY

    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
        len(BODY),
        BODY,
    )
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(send_spec)
    pub = ctx.socket(zmq.PUB)
    pub.connect(recv_spec)
    time.sleep(SETTLE)
    while True:
        msg = pull.recv()
        sender, conn_id, rest = msg.split(b" ", 2)
        if rest.startswith(b"@*"):  # a disconnect notice
            continue
        pub.send(b"%s %d:%s, %s" % (sender, len(conn_id), conn_id, reply))


# -- rows ------------------------------------------------------------------------------------

Command = Callable[[str], list[str]]  # (--zeromq send spec) -> argv


@dataclass
class Row:
    name: str
    command: Command | None  # None: no handler process (Mongrel2 answers by itself)
    path: str = "/"
    skip: str | None = None
    samples: list[Sample] = field(default_factory=list)
    m2_cpu_us: list[float] = field(default_factory=list)
    failure: str | None = None


def _chaussette(engine: str) -> Command:
    def command(spec: str) -> list[str]:
        argv = [*hb.chaussette_argv(), "--protocol", "mongrel2", "--backend", engine]
        return [*argv, "--zeromq", spec, "--log-level", "warning", APP]

    return command


def _raw(spec: str) -> list[str]:
    send = spec
    host, port = spec.rsplit(":", 1)
    return [sys.executable, "-m", "bench.mongrel2", "--serve-raw", send, f"{host}:{int(port) - 1}"]


def build_rows() -> list[Row]:
    def missing(*mods: str) -> str | None:
        import importlib.util

        absent = [m for m in mods if importlib.util.find_spec(m) is None]
        return f"{', '.join(absent)} not installed" if absent else None

    peer = None if shutil.which("mongrel2") and shutil.which("m2sh") else "mongrel2 not found"
    return [
        Row("mongrel2-dir", None, DIR_PATH, skip=peer),
        Row("raw-pyzmq", _raw, skip=peer or missing("zmq")),
        Row("chaussette-threads", _chaussette("threads"), skip=peer or missing("zmq")),
        Row("chaussette-gevent", _chaussette("gevent"), skip=peer or missing("zmq", "gevent")),
        Row(
            "chaussette-eventlet",
            _chaussette("eventlet"),
            skip=peer or missing("zmq", "eventlet"),
        ),
    ]


# -- Mongrel2 --------------------------------------------------------------------------------


class Mongrel2:
    """One Mongrel2, configured in ``scratch`` and run from there, pinned to ``cpu``."""

    def __init__(self, scratch: Path, cpu: int | None) -> None:
        from bench.apps import HELLO as BODY

        self.dir = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        for sub in ("run", "logs", "tmp", "static"):
            (scratch / sub).mkdir(exist_ok=True)
        (scratch / "static" / "hello.txt").write_bytes(BODY)
        self.port = free_port()
        self.send = _port_pair()
        conf = CONF.format(
            send=self.send,
            recv=self.send - 1,
            ident=HANDLER_IDENT,
            uuid=SERVER_UUID,
            port=self.port,
        )
        (scratch / "mongrel2.conf").write_text(conf)
        env = dict(os.environ, LOGNAME=os.environ.get("LOGNAME", "bench"))

        def m2sh(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                ["m2sh", *args], cwd=scratch, env=env, capture_output=True, timeout=60, check=True
            )

        m2sh("load", "-config", "mongrel2.conf", "-db", "config.sqlite")
        listed = m2sh("servers", "-db", "config.sqlite")
        if SERVER_UUID.encode() not in listed.stdout:
            raise StartFailed(f"m2sh load failed: {listed.stdout!r} {listed.stderr!r}")
        # bench.http's Server runs in the repository: cd to the scratch dir first
        script = f"cd {scratch} && exec mongrel2 config.sqlite {SERVER_UUID}"
        self.server = Server(["sh", "-c", script], cpu, scratch / "mongrel2.log")
        deadline = time.monotonic() + 30
        while _get_status(self.port, DIR_PATH) != 200:
            if not self.server.alive() or time.monotonic() > deadline:
                raise StartFailed(f"mongrel2 did not start: {self.server.tail()}")
            time.sleep(0.05)

    @property
    def spec(self) -> str:
        return f"tcp://127.0.0.1:{self.send}"

    def stop(self) -> None:
        self.server.stop()


def _port_pair() -> int:
    import socket

    for _ in range(200):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind((HOST, port - 1))
            except OSError:
                continue
        return port
    raise StartFailed("no free pair of ports")


def _get_status(port: int, path: str) -> int | None:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


# -- the run ---------------------------------------------------------------------------------


def measure(row: Row, m2: Mongrel2, opts: Options, scratch: Path) -> None:
    handler: Server | None = None
    try:
        if row.command is not None:
            log = scratch / f"{row.name}-{len(row.samples)}.log"
            handler = Server(row.command(m2.spec), opts.server_cpu, log)
            deadline = time.monotonic() + hb.READY_TIMEOUT
            while probe(m2.port) != 200:
                if not handler.alive() or time.monotonic() > deadline:
                    raise StartFailed(f"no 200 through the handler: {handler.tail()}")
                time.sleep(0.05)
        measured = handler or m2.server
        url_port = m2.port
        scenario = Scenario(HELLO.name, HELLO.title, row.path)
        if opts.warmup:
            run_wrk(opts, scenario, url_port, opts.warmup, measured)
        m2_before = tree_cpu_ns(m2.server.proc.pid)
        sample = run_wrk(opts, scenario, url_port, opts.duration, measured)
        m2_cpu = tree_cpu_ns(m2.server.proc.pid) - m2_before
        if handler is None:
            sample.cpu_us = None  # no handler: Mongrel2's CPU is the other column
        row.samples.append(sample)
        row.m2_cpu_us.append(m2_cpu / 1000 / max(sample.requests, 1))
    except (StartFailed, RuntimeError) as exc:
        row.failure = str(exc)
    finally:
        if handler is not None:
            handler.stop()


def _median(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def table(rows: list[Row]) -> str:
    by_name = {row.name: row for row in rows}

    def rps(name: str) -> float | None:
        row = by_name.get(name)
        return _median([s.rps for s in row.samples]) if row and row.samples else None

    dir_rps, raw_rps = rps("mongrel2-dir"), rps("raw-pyzmq")
    out = [
        [
            "row",
            "req/s",
            "p99 ms",
            "handler CPU µs/req",
            "Mongrel2 CPU µs/req",
            "vs Dir",
            "vs raw pyzmq",
            "errors",
        ]
    ]
    for row in rows:
        if row.skip:
            continue
        if not row.samples:
            out.append([row.name, f"failed: {row.failure}", "", "", "", "", "", ""])
            continue
        r = rps(row.name)
        p99 = _median([s.p99_ms for s in row.samples])
        cpu = _median([s.cpu_us for s in row.samples])
        m2cpu = _median(list(row.m2_cpu_us))
        errors = sum(s.errors for s in row.samples)
        out.append(
            [
                row.name,
                f"{r:,.0f}" if r else "-",
                f"{p99:.1f}" if p99 is not None else "-",
                f"{cpu:.1f}" if cpu is not None else "-",
                f"{m2cpu:.1f}" if m2cpu is not None else "-",
                f"{r / dir_rps:.2f}x" if r and dir_rps else "-",
                f"{r / raw_rps:.2f}x" if r and raw_rps else "-",
                str(errors),
            ]
        )
    return markdown_table(out)


# -- where the time goes -----------------------------------------------------------------------


def offline_server(app: Callable[..., Any]) -> Any:
    """A Mongrel2Server that is never started, its replies dropped: for timing the Python
    a request costs in the handler, without ZeroMQ (``--breakdown``, bench/m2_micro.py)."""
    from chaussette.drivers.mongrel2 import Mongrel2Server
    from chaussette.settings import Settings
    from chaussette.sockets import Outbound

    class Publisher:
        def send(self, frame: bytes, epoch: int) -> None:
            return

        def epoch_now(self) -> int:
            return 0

        def check(self) -> None:
            return

    settings = Settings(protocol="mongrel2", zeromq="tcp://127.0.0.1:9999")
    server = Mongrel2Server(app, Outbound("bench"), settings)
    server.publisher = Publisher()
    return server


def breakdown(count: int = 10000) -> str:
    """Time each stage of chaussette's handler on one captured request, in-process (no
    ZeroMQ): what a request costs in Python before the sockets."""
    from bench.apps import app
    from chaussette.drivers.environ import base_environ
    from chaussette.drivers.mongrel2 import M2Conn, Reply, _no_body
    from chaussette.drivers.response import BufferedResponse
    from chaussette.protocols import mongrel2 as core
    from chaussette.wsgi import BodyReader, ErrorStream

    headers: dict[str, str | list[str]] = {
        "REMOTE_ADDR": "127.0.0.1",
        "METHOD": "GET",
        "URL_SCHEME": "http",
        "PATTERN": "/",
        "URI": "/",
        "VERSION": "HTTP/1.1",
        "PATH": "/",
        "host": "127.0.0.1:8080",
        "user-agent": "wrk",
        "x-forwarded-for": "127.0.0.1",
    }
    msg = core.encode_request(SERVER_UUID, "42", "/", headers)
    request = core.parse_request(msg)

    server = offline_server(app)
    base = base_environ(True, True)
    conn = M2Conn(("x", "42"))

    def environ() -> dict[str, object]:
        env = base.copy()
        env.update(core.environ_from_request(request))
        env["wsgi.url_scheme"] = core.url_scheme(request)
        env["wsgi.input"] = BodyReader(_no_body)
        env["wsgi.errors"] = ErrorStream()
        return env

    def respond() -> None:
        BufferedResponse(app, environ(), Reply(server, conn, request)).run()

    stages: list[tuple[str, Callable[[], object]]] = [
        ("parse_request (core: tnetstring headers)", lambda: core.parse_request(msg)),
        ("environ (core's environ_from_request + wsgi.*)", environ),
        ("app + WSGI host + reply bytes (incl. environ)", respond),
        ("all of the handler's Python (dispatch -> reply)", lambda: _run(server, msg)),
    ]
    lines = [f"one GET of {len(msg)} bytes, best of 5 x {count}; µs per request:"]
    for name, fn in stages:
        best = float("inf")
        for _ in range(5):  # the least disturbed run: other processes only add time
            start = time.perf_counter()
            for _ in range(count):
                fn()
            best = min(best, (time.perf_counter() - start) / count * 1e6)
        lines.append(f"  {best:6.1f}  {name}")
    return "\n".join(lines)


def _run(server: object, msg: bytes) -> None:
    job = server.dispatch(msg)  # type: ignore[attr-defined]
    if job is not None:
        server.run(*job)  # type: ignore[attr-defined]


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.mongrel2", description=__doc__)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--only", nargs="+", default=[], metavar="GLOB")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="one round of 1 s, 1 s warm-up")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--serve-raw", nargs=2, metavar=("SEND_SPEC", "RECV_SPEC"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_raw:
        serve_raw(*args.serve_raw)
        return 0
    if args.breakdown:
        print(breakdown())
        return 0
    rows = build_rows()
    if args.only:
        keep = {"mongrel2-dir", "raw-pyzmq"}
        rows = [
            r for r in rows if r.name in keep or any(fnmatch.fnmatch(r.name, p) for p in args.only)
        ]
    if args.list:
        for row in rows:
            print(f"{row.name:22} {'skipped: ' + row.skip if row.skip else 'runs'}")
        return 0
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 1, 1
    server_cpu, client_cpu = hb.pin_cores(args)
    scratch = Path(tempfile.mkdtemp(prefix="bench-m2-"))
    opts = Options(
        duration=args.duration,
        warmup=args.warmup,
        runs=args.runs,
        connections=args.connections,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        scenarios=(HELLO,),
    )
    script = scratch / "hello.lua"
    script.write_text(wrk_script(HELLO))
    opts.scripts[HELLO.name] = script
    live = [row for row in rows if not row.skip]
    m2 = Mongrel2(scratch / "m2", client_cpu) if live else None
    try:
        for round_no in range(args.runs):
            order = live[round_no % len(live) :] + live[: round_no % len(live)]
            for row in order:
                assert m2 is not None
                print(f"round {round_no + 1}/{args.runs}: {row.name}", file=sys.stderr)
                measure(row, m2, opts, scratch)
    finally:
        if m2 is not None:
            m2.stop()
    report = "\n\n".join(
        [
            "## Mongrel2: hello through Mongrel2 to a handler",
            table(rows),
            f"Mongrel2 and wrk on core {client_cpu}, the handler on core {server_cpu}; "
            f"wrk -t1 -c{opts.connections} -d{opts.duration}s; median of {opts.runs} "
            "round(s).",
            "```\n" + breakdown() + "\n```",
        ]
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mongrel2.md").write_text(report + "\n")
    (args.out / "mongrel2.json").write_text(
        json.dumps(
            {
                r.name: {
                    "samples": [s.__dict__ for s in r.samples],
                    "mongrel2_cpu_us": r.m2_cpu_us,
                    "failure": r.failure,
                    "skip": r.skip,
                }
                for r in rows
            },
            indent=2,
        )
    )
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
