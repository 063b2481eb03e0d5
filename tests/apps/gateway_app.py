"""tests/apps/routes.py inside ``wsgiref.validate.validator``, plus one route the test drives.

Used by the tests that put a real gateway (nginx, cgi-fcgi) in front of chaussette's own
FastCGI and SCGI servers: any breach of PEP 3333 by the server raises AssertionError (or
warns WSGIWarning) in the app and shows as a 500 and in the server's log.

?dump=1       any path: the environ's str values as JSON (so that a test can see what the
               app got even when PATH_INFO is not one routes.py knows)
/gate?path=P   a streamed response: "first piece" is sent at once, then the app waits until
               the file P exists (at most GATE_WAIT seconds), then sends "second piece".
               A test that reads the first piece before it creates P has proved that the
               piece went through every buffer on the way while the app still held the rest.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs
from wsgiref.validate import validator

from tests.apps import routes

GATE_WAIT = 20.0  # seconds; bounded, so a stuck test never leaves the app waiting forever
FIRST = b"first piece\n"
SECOND = b"second piece\n"
LATE = b"gate never opened\n"


def _gate(path: str) -> Iterator[bytes]:
    yield FIRST
    deadline = time.monotonic() + GATE_WAIT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield SECOND if os.path.exists(path) else LATE


def _dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "dump" in query:
        data = {k: v for k, v in environ.items() if isinstance(v, str)}
        body = json.dumps(data).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]
    if environ.get("PATH_INFO") == "/gate":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _gate(query["path"][-1])
    routed: Callable[..., Iterable[bytes]] = routes.application
    return routed(environ, start_response)


application = validator(_dispatch)
