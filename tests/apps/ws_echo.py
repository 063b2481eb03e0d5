"""A websocket echo app for ``environ['wsgi.websocket']`` (gevent-websocket's API).

/ws        echoes every message, text as text and binary as binary. Two text messages
           are commands: ``bye`` ends the app without closing (the server must then close
           with 1000), ``close:CODE`` closes with that code and the reason ``by app``,
           ``raise`` makes the app raise (the server must then close with 1011).
/ws-info   sends one text message: JSON of the websocket's class and the environ keys the
           server set, then echoes like /ws.
anything else, and a plain HTTP request to /ws: tests/apps/routes.py
"""

from __future__ import annotations

import json

from tests.apps import routes


def _echo(ws):
    while True:
        message = ws.receive()
        if message is None:  # the client closed (or the connection broke)
            return
        if message == "bye":
            return
        if message == "raise":
            raise RuntimeError("boom inside a websocket")
        if isinstance(message, str) and message.startswith("close:"):
            ws.close(int(message[len("close:") :]), "by app")
            return
        ws.send(message, binary=not isinstance(message, str))


def application(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        return routes.application(environ, start_response)
    if environ["PATH_INFO"] == "/ws-info":
        ws.send(
            json.dumps(
                {
                    "class": type(ws).__module__ + "." + type(ws).__name__,
                    "version": environ.get("wsgi.websocket_version"),
                    "path": environ["PATH_INFO"],
                }
            )
        )
    _echo(ws)
    return []
