"""The one WSGI application every server in the benchmark serves.

It does as little as a WSGI app can, so that what is measured is the server:

- ``GET /``: a 22-byte hello (the same body as ``chaussette.hello``);
- ``GET /big``: 64 KiB from memory, in one piece;
- ``POST /upload``: reads the request body in 64 KiB ``read(n)`` calls up to its
  ``Content-Length`` and answers with the number of bytes read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

HELLO = b"Hello from chaussette\n"
BIG = b"x" * 65536
CHUNK = 65536


def _read_body(environ: dict[str, Any]) -> int:
    stream = environ["wsgi.input"]
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    total = 0
    while remaining > 0:
        data = stream.read(min(CHUNK, remaining))
        if not data:
            break
        total += len(data)
        remaining -= len(data)
    return total


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/big":
        body = BIG
    elif path == "/upload":
        body = b"%d\n" % _read_body(environ)
    else:
        body = HELLO
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
