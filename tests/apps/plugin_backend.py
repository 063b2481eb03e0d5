"""A third-party backend, as another package would ship it: a BackendInfo that the
``chaussette.backends`` entry point names, and an adapter (here the wsgiref one, with a
header that proves this adapter served the request)."""

from __future__ import annotations

from chaussette.backends.registry import BackendInfo
from chaussette.backends.wsgiref import WSGIRefServer


class PluggedServer(WSGIRefServer):
    def __init__(self, app, listener, settings):
        def tagged(environ, start_response):
            def start(status, headers, exc_info=None):
                return start_response(status, [*headers, ("X-Backend", "plugged")], exc_info)

            return app(environ, start)

        super().__init__(tagged, listener, settings)


INFO = BackendInfo(
    "plugged",
    "http",
    "tests.apps.plugin_backend:PluggedServer",
    "a test plugin",
    threads=True,
    keepalive=False,
)
NOT_INFO = object()
SHADOWS_BUILTIN = BackendInfo("wsgiref", "http", "tests.apps.plugin_backend:PluggedServer", "x")
