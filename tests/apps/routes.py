"""A multipurpose test app. Every route is small and observable from outside.

/            hello
/environ     the str values of the environ as JSON
/echo        POST: reads wsgi.input in chunks; answers length and sha256 of the body
/lines       POST: reads wsgi.input with readline(); answers the line count
/slow?s=N    sleeps N seconds, then answers
/stream?n=K&pause=S   K chunks, S seconds apart
/big?size=N  N bytes (default 64 KiB)
/file?size=N wsgi.file_wrapper over a temp file of N bytes
/error       raises before start_response
/error-mid   raises after the first chunk
/pid         the process id (to tell processes apart)
/closed      a streaming response whose close() writes a marker file (?marker=PATH)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from urllib.parse import parse_qs


def _qs(environ):
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _reply(start_response, body, ctype="text/plain"):
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


class _Closing:
    def __init__(self, marker, n, pause):
        self.marker, self.n, self.pause = marker, n, pause

    def __iter__(self):
        for _ in range(self.n):
            yield b"x" * 65536
            time.sleep(self.pause)

    def close(self):
        with open(self.marker, "w") as f:
            f.write("closed")


def application(environ, start_response):
    path = environ["PATH_INFO"]
    q = _qs(environ)
    if path == "/":
        return _reply(start_response, b"hello")
    if path == "/environ":
        data = {k: v for k, v in environ.items() if isinstance(v, str)}
        return _reply(start_response, json.dumps(data).encode(), "application/json")
    if path == "/echo":
        h, n = hashlib.sha256(), 0
        chunk = int(q.get("chunk", "65536"))
        while True:
            data = environ["wsgi.input"].read(chunk)
            if not data:
                break
            h.update(data)
            n += len(data)
        return _reply(start_response, f"{n} {h.hexdigest()}".encode())
    if path == "/lines":
        count = 0
        while environ["wsgi.input"].readline():
            count += 1
        return _reply(start_response, str(count).encode())
    if path == "/slow":
        time.sleep(float(q.get("s", "1")))
        return _reply(start_response, b"slow done")
    if path == "/stream":
        n, pause = int(q.get("n", "3")), float(q.get("pause", "0.2"))
        start_response("200 OK", [("Content-Type", "text/plain")])

        def gen():
            for i in range(n):
                yield f"chunk {i}\n".encode()
                time.sleep(pause)

        return gen()
    if path == "/big":
        return _reply(start_response, b"b" * int(q.get("size", str(64 * 1024))))
    if path == "/file":
        size = int(q.get("size", "100000"))
        f = tempfile.TemporaryFile()  # noqa: SIM115 (the file wrapper closes it)
        f.write(b"f" * size)
        f.seek(0)
        start_response(
            "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        )
        return environ["wsgi.file_wrapper"](f, 65536)
    if path == "/error":
        raise RuntimeError("boom before start_response")
    if path == "/error-mid":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def broken():
            yield b"first part\n"
            raise RuntimeError("boom mid-stream")

        return broken()
    if path == "/pid":
        return _reply(start_response, str(os.getpid()).encode())
    if path == "/closed":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _Closing(q["marker"], int(q.get("n", "1000")), float(q.get("pause", "0.01")))
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


app = application
