"""Each library of the benchmark started by itself, the way its own documentation shows.

    python -m bench.native NAME HOST PORT

These are the "native" rows that each chaussette backend is compared with: the same library
serving the same ``bench.apps:app``, without chaussette. One change is made to every one of
them: the access log is off, as it is in chaussette by default (a line per request would
measure the logger, not the server). Nothing else is tuned — no TCP_NODELAY, no pool size,
no thread count — so where chaussette configures a library better than its defaults, the
ratio shows it. The greenlet servers are monkey-patched before the app is imported, as
chaussette does unless ``--no-monkey``.

``waitress`` is not here: its own runner is the ``waitress-serve`` script.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def wsgiref(host: str, port: int) -> None:
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from bench.apps import app

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    make_server(host, port, app, handler_class=QuietHandler).serve_forever()


def gevent(host: str, port: int) -> None:
    from gevent import monkey

    monkey.patch_all()
    from gevent.pywsgi import WSGIServer

    from bench.apps import app

    WSGIServer((host, port), app, log=None).serve_forever()


def geventwebsocket(host: str, port: int) -> None:
    # Also what python-socketio documents for its gevent mode with websockets.
    from gevent import monkey

    monkey.patch_all()
    from gevent.pywsgi import WSGIServer
    from geventwebsocket.handler import WebSocketHandler

    from bench.apps import app

    WSGIServer((host, port), app, handler_class=WebSocketHandler, log=None).serve_forever()


def ws4py(host: str, port: int) -> None:
    from gevent import monkey

    monkey.patch_all()
    from ws4py.server.geventserver import WSGIServer

    from bench.apps import app

    WSGIServer((host, port), app, log=None).serve_forever()


def eventlet(host: str, port: int) -> None:
    import warnings

    warnings.simplefilter("ignore")  # eventlet's deprecation notice
    import eventlet as _eventlet

    _eventlet.monkey_patch()
    import eventlet.wsgi

    from bench.apps import app

    eventlet.wsgi.server(_eventlet.listen((host, port)), app, log_output=False)


def tornado(host: str, port: int) -> None:
    import asyncio

    from tornado.httpserver import HTTPServer
    from tornado.wsgi import WSGIContainer

    from bench.apps import app

    async def main() -> None:
        HTTPServer(WSGIContainer(app)).listen(port, host)
        await asyncio.Event().wait()

    asyncio.run(main())


def bjoern(host: str, port: int) -> None:
    import bjoern as _bjoern

    from bench.apps import app

    _bjoern.run(app, host, port)


def meinheld(host: str, port: int) -> None:
    from meinheld import server

    from bench.apps import app

    server.set_access_logger(None)
    server.set_keepalive(5)  # off by default; chaussette's backend turns it on
    server.listen((host, port))
    server.run(app)


RUNNERS: dict[str, Callable[[str, int], None]] = {
    "wsgiref": wsgiref,
    "gevent": gevent,
    "geventwebsocket": geventwebsocket,
    "ws4py": ws4py,
    "eventlet": eventlet,
    "tornado": tornado,
    "bjoern": bjoern,
    "meinheld": meinheld,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in RUNNERS:
        print(f"usage: python -m bench.native {{{','.join(RUNNERS)}}} HOST PORT", file=sys.stderr)
        return 2
    name, host, port = argv
    RUNNERS[name](host, int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
