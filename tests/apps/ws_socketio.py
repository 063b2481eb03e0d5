"""A python-socketio app: ``socketio.WSGIApp`` around tests/apps/routes.py.

Events: ``echo`` answers its data through the acknowledgement; ``shout`` makes the server
emit ``shouted`` with the data upper-cased back to the sender. ``GET /sio-mode`` answers the
server's async_mode and ``GET /sio-clients`` how many clients are connected.

``application`` creates its ``socketio.Server`` without an async_mode, as most apps do;
``make(mode)`` creates one with ``async_mode=mode``.
"""

from __future__ import annotations

import socketio

from tests.apps import routes


def make(async_mode=None):
    sio = socketio.Server(async_mode=async_mode)
    clients = set()

    @sio.event
    def connect(sid, environ):
        clients.add(sid)

    @sio.event
    def disconnect(sid, *reason):
        clients.discard(sid)

    @sio.event
    def echo(sid, data):
        return data

    @sio.event
    def shout(sid, data):
        sio.emit("shouted", data.upper(), to=sid)

    def http(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/sio-mode":
            body = str(sio.async_mode).encode()
        elif path == "/sio-clients":
            body = str(len(clients)).encode()
        else:
            return routes.application(environ, start_response)
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return socketio.WSGIApp(sio, http)


application = make()
