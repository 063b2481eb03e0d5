"""Micro-benchmark of the Mongrel2 protocol core: CPU time per call, no I/O.

    python -m bench.m2_micro [--count N] [--repeat R]

For each message (the benchmark's GET as wrk sends it through Mongrel2, and the captured
GET/POST requests of tests/data, tnetstring and JSON headers), times in CPU seconds
(``time.process_time``, so other processes on the machine do not count) over ``count``
calls, best of ``repeat``:

- ``parse``: ``parse_request``;
- ``environ``: ``environ_from_request`` + ``url_scheme`` on a parsed request;
- ``handler``: the handler's whole Python path (``Mongrel2Server.dispatch`` and ``run``:
  parse, environ, the app, the WSGI host, the reply bytes), ZeroMQ replaced by a no-op;
- ``core``: everything the handler asks of the core for one request, in the driver's
  order: parse, ``is_disconnect``, ``upload_stage``, ``upload_start``, ``environ``,
  ``url_scheme``, ``keep_alive``, ``response_head``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from chaussette.protocols import mongrel2 as core

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SERVER_UUID = "f400bf85-4538-4f7a-8908-67e313d515c2"

# what wrk's GET / becomes when Mongrel2 forwards it (as bench/mongrel2.py's breakdown)
BENCH_HEADERS: dict[str, str | list[str]] = {
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
REPLY_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "22")]


def messages() -> list[tuple[str, bytes]]:
    found = [
        ("bench GET (tnet)", core.encode_request(SERVER_UUID, "42", "/", BENCH_HEADERS)),
        ("bench GET (json)", core.encode_request(SERVER_UUID, "42", "/", BENCH_HEADERS, json=True)),
    ]
    for name in ("tnet_get", "json_get", "tnet_post", "json_post"):
        path = DATA / f"mongrel2_{name}.bin"
        if path.exists():
            found.append((f"capture {name}", path.read_bytes()))
    return found


def per_request(msg: bytes) -> None:
    request = core.parse_request(msg)
    if request.is_disconnect:
        return
    core.upload_stage(request)
    if request.upload_start is not None:
        return
    core.environ_from_request(request)
    core.url_scheme(request)
    core.keep_alive(request)
    core.response_head(request, "200 OK", REPLY_HEADERS, chunked=False, close=False)


def handler_stage(msg: bytes) -> Callable[[], object]:
    """The handler's whole Python path for ``msg`` (dispatch -> reply bytes), in-process:
    a Mongrel2Server whose publisher drops what it is given (as bench/mongrel2.py's
    breakdown)."""
    from bench.apps import app
    from bench.mongrel2 import offline_server

    server = offline_server(app)

    def run() -> None:
        job = server.dispatch(msg)
        if job is not None:
            server.run(*job)

    return run


def environ(request: core.Request) -> None:
    core.environ_from_request(request)
    core.url_scheme(request)


def cpu_us(fn: Callable[[], object], count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(count):
            fn()
        best = min(best, time.process_time() - start)
    return best / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.m2_micro", description=__doc__)
    parser.add_argument("--count", type=int, default=50000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"CPU µs per call, best of {args.repeat} x {args.count}")
    print(f"{'message':24} {'bytes':>5} {'parse':>7} {'environ':>7} {'core':>7} {'handler':>7}")
    for name, msg in messages():
        parse = cpu_us(partial(core.parse_request, msg), args.count, args.repeat)
        env = cpu_us(partial(environ, core.parse_request(msg)), args.count, args.repeat)
        whole = cpu_us(partial(per_request, msg), args.count, args.repeat)
        handler = cpu_us(handler_stage(msg), args.count, args.repeat)
        print(f"{name:24} {len(msg):5} {parse:7.2f} {env:7.2f} {whole:7.2f} {handler:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
