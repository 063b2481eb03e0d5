"""The routes app plus a few routes the HTTP backend tests need.

/env/ANYTHING          the str values of the environ as JSON, for any path
/gate?dir=D&name=N     a streamed response: "open" at once, then waits (at most 20 s) for
                       the file D/N to exist, then "done". The test, not a clock, decides
                       when the response ends.
/file-tail?size=N&skip=K   wsgi.file_wrapper over an N-byte file of varied bytes, seeked
                       to K first; Content-Length N-K
/file-nolen?size=N     wsgi.file_wrapper with no Content-Length
/overlong              declares Content-Length 5 and yields 10 bytes
anything else          tests/apps/routes.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from urllib.parse import parse_qs

from tests.apps import routes


def _qs(environ):
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def pattern(size):
    """The bytes of /file-tail and /file-nolen (251 is prime: no block lines up)."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def _pattern_file(size):
    f = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the server via the file wrapper)
    f.write(pattern(size))
    f.seek(0)
    return f


def _gate(environ, start_response):
    q = _qs(environ)
    gate = os.path.join(q["dir"], q["name"])
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        yield b"open\n"
        deadline = time.monotonic() + 20
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                yield b"gate timeout\n"
                return
            time.sleep(0.01)
        yield b"done\n"

    return body()


def application(environ, start_response):
    path = environ["PATH_INFO"]
    q = _qs(environ)
    if path.startswith("/env/"):
        data = {k: v for k, v in environ.items() if isinstance(v, str)}
        body = json.dumps(data).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]
    if path == "/gate":
        return _gate(environ, start_response)
    if path == "/file-tail":
        size, skip = int(q["size"]), int(q["skip"])
        f = _pattern_file(size)
        f.seek(skip)
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(size - skip))],
        )
        return environ["wsgi.file_wrapper"](f, 65536)
    if path == "/file-nolen":
        f = _pattern_file(int(q["size"]))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f, 65536)
    if path == "/overlong":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return iter([b"12345", b"67890"])
    return routes.application(environ, start_response)
