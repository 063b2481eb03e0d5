"""The app of the HTTP backend conformance suite (tests/test_http_backends.py).

Every route of tests/apps/http_app.py (and through it tests/apps/routes.py), plus:

/lines-sha             POST: reads wsgi.input with readline() only; answers the line count
                       and the sha256 of the lines joined back together
X-Validate: 1          a request carrying this header is served by the same app inside
                       ``wsgiref.validate.validator``: a breach of PEP 3333 by the server
                       raises AssertionError or warns WSGIWarning, and shows in the log.

One process serves both the plain and the validated app, so the validator costs no
extra server per backend and socket kind.
"""

from __future__ import annotations

import hashlib
from wsgiref.validate import validator

from tests.apps import http_app


def _lines_sha(environ, start_response):
    h, count = hashlib.sha256(), 0
    while True:
        line = environ["wsgi.input"].readline()
        if not line:
            break
        count += 1
        h.update(line)
    body = f"{count} {h.hexdigest()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _plain(environ, start_response):
    if environ["PATH_INFO"] == "/lines-sha":
        return _lines_sha(environ, start_response)
    return http_app.application(environ, start_response)


_validated = validator(_plain)


def application(environ, start_response):
    if environ.get("HTTP_X_VALIDATE") == "1":
        return _validated(environ, start_response)
    return _plain(environ, start_response)
