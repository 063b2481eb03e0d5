"""gateway_app's routes, inside ``wsgiref.validate.validator``, plus one for Mongrel2 uploads.

/first?n=N   reads N bytes of the body (fewer if it ends), answers at once with their count
             and sha256 without reading the rest: a client that gets this answer while it
             has not sent its whole body proves the app read the upload as it was written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.validate import validator

from tests.apps import gateway_app


def _dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/first":
        want = int(parse_qs(environ.get("QUERY_STRING", "")).get("n", ["65536"])[-1])
        data = b""
        while len(data) < want:
            more = environ["wsgi.input"].read(min(65536, want - len(data)))
            if not more:
                break
            data += more
        body = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]
    return gateway_app._dispatch(environ, start_response)


application = validator(_dispatch)
