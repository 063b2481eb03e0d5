"""A websocket echo app for ws4py (``environ['ws4py.websocket']``).

An upgrade request goes to ws4py's ``WebSocketWSGIApplication`` with an echo handler:
text comes back as text and binary as binary; ``bye`` closes with ws4py's default (1000)
and ``close:CODE`` closes with that code and the reason ``by app``; ``raise`` makes the
handler raise (the server must then close with 1011).
Any other request: tests/apps/routes.py.
"""

from __future__ import annotations

from ws4py.server.wsgiutils import WebSocketWSGIApplication
from ws4py.websocket import WebSocket

from tests.apps import routes


class Echo(WebSocket):
    def received_message(self, message):
        data = message.data
        if not message.is_binary:
            text = data.decode("utf-8")
            if text == "bye":
                self.close()
                return
            if text == "raise":
                raise RuntimeError("boom inside a websocket")
            if text.startswith("close:"):
                self.close(int(text[len("close:") :]), "by app")
                return
        self.send(data, message.is_binary)


websockets = WebSocketWSGIApplication(handler_cls=Echo)


def application(environ, start_response):
    if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
        return websockets(environ, start_response)
    return routes.application(environ, start_response)
