"""A small Flask app for tests/test_frameworks.py.

/search?q=..&tag=..&tag=..   the decoded query arguments as JSON
/hello/<name>                plain text greeting (name decoded from the path)
/form                        POST form: fields, a file upload and the raw content type
/json                        POST JSON: echoed back with its key count
/url                         url_for(..., _external=True) and request.host_url
/stream?n=K&gate=PATH        K lines through stream_with_context; after the first line it
                             waits (bounded) until PATH exists, to prove nothing is buffered
/boom                        raises (Flask answers 500 itself)

``app`` is the plain app; ``validated_app`` is the same app inside
``wsgiref.validate.validator``, so that chaussette's environ, start_response and the
iterable's lifetime are checked by the stdlib on every request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from wsgiref.validate import validator

from flask import Flask, Response, jsonify, request, stream_with_context, url_for

app = Flask(__name__)


@app.get("/search")
def search() -> Response:
    return jsonify(
        q=request.args.get("q"),
        tags=request.args.getlist("tag"),
        raw=request.query_string.decode("latin-1"),
    )


@app.get("/hello/<name>")
def hello(name: str) -> tuple[str, int, dict[str, str]]:
    return f"hello {name}", 200, {"Content-Type": "text/plain; charset=utf-8"}


@app.post("/form")
def form() -> Response:
    upload = request.files.get("upload")
    return jsonify(
        fields=request.form.to_dict(flat=False),
        upload=None
        if upload is None
        else {
            "filename": upload.filename,
            "content": upload.read().decode("utf-8"),
        },
        content_type=request.mimetype,
    )


@app.post("/json")
def json_echo() -> Response:
    data = request.get_json()
    return jsonify(received=data, keys=len(data), method=request.method)


@app.get("/url")
def urls() -> Response:
    return jsonify(
        external=url_for("hello", name="x y", _external=True),
        host_url=request.host_url,
        url=request.url,
    )


@app.get("/stream")
def stream() -> Response:
    count = request.args.get("n", 3, type=int)
    gate = request.args.get("gate")

    def lines() -> Iterator[str]:
        # request is still usable here only thanks to stream_with_context
        yield f"line 0 of {count} for {request.path}\n"
        if gate:
            deadline = time.monotonic() + 10
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.02)
        for i in range(1, count):
            yield f"line {i} of {count} for {request.path}\n"

    return Response(stream_with_context(lines()), mimetype="text/plain")


@app.get("/boom")
def boom() -> str:
    raise RuntimeError("boom from the flask view")


class _SizedReads:
    """Werkzeug calls ``wsgi.input.read()`` without a size; PEP 3333 wants one and the
    validator of some Pythons (3.11.2) asserts it. Pass ``-1`` explicitly so the validator
    keeps checking chaussette's side (environ, start_response, iterable) on every request."""

    def __init__(self, stream):
        self._stream = stream

    def read(self, size=-1):
        return self._stream.read(size)

    def readline(self, *args):
        return self._stream.readline(*args)

    def readlines(self, *args):
        return self._stream.readlines(*args)

    def __iter__(self):
        return iter(self._stream)


def _sized_reads(inner):
    def wrapped(environ, start_response):
        environ["wsgi.input"] = _SizedReads(environ["wsgi.input"])
        return inner(environ, start_response)

    return wrapped


validated_app = validator(_sized_reads(app))
