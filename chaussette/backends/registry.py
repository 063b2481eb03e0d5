"""The registry of (protocol, backend) pairs.

Each entry names its adapter as ``"module:attr"``, imported only when that backend is
chosen, with the top-level modules its library needs and the pip extra that installs them.
It also says what the backend can do, so that bad combinations are refused before anything
starts and ``--backends`` can show it.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from chaussette.errors import MissingDependency, UsageError

if TYPE_CHECKING:
    from chaussette.backends.base import Server


@dataclass(frozen=True)
class BackendInfo:
    name: str
    protocol: str
    target: str  # "module:attr" of the adapter class
    summary: str
    requires: tuple[str, ...] = ()  # importable modules the library needs
    extra: str | None = None  # pip install 'chaussette[extra]'
    install: str | None = None  # how to install, when the extra alone is not enough
    unix: bool = True  # can serve a unix socket
    drain: bool = True  # finishes in-flight requests on SIGTERM
    threads: bool = False  # honours --threads
    pool: bool = False  # honours --spawn
    monkey: bool = False  # monkey-patches unless --no-monkey
    websocket: bool = False
    keepalive: bool = True  # serves several requests on one connection
    chunked_input: bool = True  # decodes chunked request bodies
    repeated_headers: bool = True  # joins a repeated request header's values
    listens: bool = True  # serves a listening socket (False: connects out, e.g. over ZeroMQ)

    def missing(self) -> list[str]:
        return [mod for mod in self.requires if importlib.util.find_spec(mod) is None]

    def installed(self) -> bool:
        return not self.missing()

    def load(self) -> type[Server]:
        missing = self.missing()
        if missing:
            raise MissingDependency(
                f"backend {self.name!r}", missing[0], self.extra or self.name, self.install
            )
        module_name, _, attr = self.target.partition(":")
        module = importlib.import_module(module_name)
        server_class: type[Server] = getattr(module, attr)
        return server_class


def _http(name: str, adapter: str, summary: str, **kw: object) -> BackendInfo:
    return BackendInfo(name, "http", f"chaussette.backends.{adapter}", summary, **kw)  # type: ignore[arg-type]


# The built-in backends. Capabilities are declared here, next to nothing that imports the
# library, so that --backends and the option checks work whether or not it is installed.
BACKENDS: tuple[BackendInfo, ...] = (
    _http(
        "wsgiref",
        "wsgiref:WSGIRefServer",
        "stdlib only: a bounded pool of worker threads (--threads), kept while idle; no keep-alive",
        threads=True,
        keepalive=False,
    ),
    _http(
        "waitress",
        "waitress:WaitressServer",
        "waitress: a thread pool (--threads)",
        requires=("waitress",),
        extra="waitress",
        threads=True,
    ),
    _http(
        "gevent",
        "gevent:GeventServer",
        "gevent pywsgi, a greenlet pool (--spawn), TCP_NODELAY",
        requires=("gevent",),
        extra="gevent",
        pool=True,
        monkey=True,
    ),
    _http(
        "fastgevent",
        "gevent:FastGeventServer",
        "gevent StreamServer + chaussette's own HTTP/1.1 and WSGI host (keep-alive, "
        "sendfile), a greenlet pool (--spawn): ~1.2x gevent on hello; no websocket",
        requires=("gevent",),
        extra="gevent",
        pool=True,
        monkey=True,
    ),
    _http(
        "meinheld",
        "meinheld:MeinheldServer",
        "meinheld (C, greenlets) in chaussette's build for greenlet 3: "
        "python -m chaussette.backends.meinheld_build",
        requires=("meinheld", "greenlet"),
        extra="meinheld",
        install=(
            "pip install 'chaussette[meinheld]' && python -m chaussette.backends.meinheld_build"
        ),
    ),
    _http(
        "eventlet",
        "eventlet:EventletServer",
        "eventlet.wsgi, a green pool (--spawn)",
        requires=("eventlet",),
        extra="eventlet",
        pool=True,
        monkey=True,
    ),
    _http(
        "tornado",
        "tornado:TornadoServer",
        "tornado HTTPServer, the app in a thread pool (--threads), responses streamed",
        requires=("tornado",),
        extra="tornado",
        threads=True,
    ),
    _http(
        "bjoern",
        "bjoern:BjoernServer",
        "bjoern (C, libev), one request at a time. CANNOT DRAIN: a stop or SIGHUP cuts "
        "uploads in progress, and idle keep-alive connections wait for the app call in "
        "progress (no timeout bounds a silent client). For restarts that drop nothing pick a "
        "backend that drains (meinheld is the C one; fastgevent, waitress); to keep bjoern, "
        "run several behind nginx (proxy_next_upstream error timeout), keep "
        "--graceful-timeout short and restart them one at a time",
        requires=("bjoern",),
        extra="bjoern",
        install="apt-get install libev-dev && pip install 'chaussette[bjoern]'",
        drain=False,
        # bjoern 3.2 glues a repeated header's values together in C, with no separator
        # ("X: a" + "X: b" -> "ab"), before any Python code sees the environ
        repeated_headers=False,
    ),
    _http(
        "geventwebsocket",
        "gevent_ws:GeventWebSocketServer",
        "gevent pywsgi + gevent-websocket: environ['wsgi.websocket']",
        requires=("gevent", "geventwebsocket"),
        extra="websocket",
        pool=True,
        monkey=True,
        websocket=True,
    ),
    _http(
        "geventws4py",
        "gevent_ws:GeventWS4PyServer",
        "gevent pywsgi + ws4py: environ['ws4py.websocket']",
        requires=("gevent", "ws4py"),
        extra="ws4py",
        pool=True,
        monkey=True,
        websocket=True,
    ),
    _http(
        "socketio",
        "gevent_ws:SocketIOServer",
        "python-socketio on gevent pywsgi + gevent-websocket",
        requires=("gevent", "geventwebsocket", "socketio"),
        extra="socketio",
        pool=True,
        monkey=True,
        websocket=True,
    ),
)


def _own(protocol: str, engine: str, summary: str, **kw: object) -> BackendInfo:
    """A pair served by chaussette's own protocol core on a concurrency engine."""
    server = "FastCGIServer" if protocol == "fastcgi" else "SCGIServer"
    target = f"chaussette.drivers.{engine}:{server}"
    return BackendInfo(engine, protocol, target, summary, **kw)  # type: ignore[arg-type]


# chaussette's own FastCGI and SCGI servers: the backend names the concurrency engine.
BACKENDS += (
    _own(
        "fastcgi",
        "threads",
        "chaussette's FastCGI on worker threads (--threads, --request-model)",
        threads=True,
    ),
    _own(
        "fastcgi",
        "gevent",
        "chaussette's FastCGI on gevent, a greenlet per request (--spawn)",
        requires=("gevent",),
        extra="gevent",
        pool=True,
        monkey=True,
    ),
    _own(
        "fastcgi",
        "eventlet",
        "chaussette's FastCGI on eventlet, a green thread per request (--spawn)",
        requires=("eventlet",),
        extra="eventlet",
        pool=True,
        monkey=True,
    ),
    _own(
        "scgi",
        "threads",
        "chaussette's SCGI on worker threads (--threads, --request-model)",
        threads=True,
        keepalive=False,
    ),
    _own(
        "scgi",
        "gevent",
        "chaussette's SCGI on gevent, a greenlet per connection (--spawn requests at once)",
        requires=("gevent",),
        extra="gevent",
        pool=True,
        monkey=True,
        keepalive=False,
    ),
    _own(
        "scgi",
        "eventlet",
        "chaussette's SCGI on eventlet, a green thread per connection (--spawn requests at once)",
        requires=("eventlet",),
        extra="eventlet",
        pool=True,
        monkey=True,
        keepalive=False,
    ),
)


def _mongrel2(engine: str, summary: str, **kw: object) -> BackendInfo:
    """A Mongrel2 handler: connects out to Mongrel2 over ZeroMQ (pyzmq), on an engine."""
    requires = ("zmq", *kw.pop("requires", ()))  # type: ignore[misc]
    target = f"chaussette.drivers.{'mongrel2' if engine == 'threads' else 'm2' + engine}"
    return BackendInfo(
        engine,
        "mongrel2",
        f"{target}:Mongrel2Server",
        summary,
        requires=requires,
        extra="mongrel2" if engine == "threads" else f"mongrel2,{engine}",
        unix=False,
        listens=False,
        **kw,  # type: ignore[arg-type]
    )


# chaussette's own Mongrel2 handler: ZeroMQ to Mongrel2, the backend names the engine.
BACKENDS += (
    _mongrel2(
        "threads",
        "chaussette's Mongrel2 handler on kept worker threads (--threads), pyzmq",
        threads=True,
    ),
    _mongrel2(
        "gevent",
        "chaussette's Mongrel2 handler on gevent (zmq.green), a greenlet per request (--spawn)",
        requires=("gevent",),
        pool=True,
        monkey=True,
    ),
    _mongrel2(
        "eventlet",
        "chaussette's Mongrel2 handler on eventlet (eventlet.green.zmq), a green thread per "
        "request (--spawn)",
        requires=("eventlet",),
        pool=True,
        monkey=True,
    ),
)


ENTRY_POINT_GROUP = "chaussette.backends"
_plugins: tuple[BackendInfo, ...] | None = None
_plugin_errors: dict[str, str] = {}


def plugins() -> tuple[BackendInfo, ...]:
    """Backends other packages declare in the ``chaussette.backends`` entry point group.

    Each entry point names a ``BackendInfo``. One that cannot be loaded is remembered with
    its error, shown by ``--backends`` and given to whoever asks for it by name.
    """
    global _plugins
    if _plugins is None:
        found: list[BackendInfo] = []
        builtin = {(b.protocol, b.name) for b in BACKENDS}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                info = ep.load()
            except Exception as exc:  # a broken plugin must not break every launch
                _plugin_errors[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
                continue
            if not isinstance(info, BackendInfo):
                _plugin_errors[ep.name] = f"{ep.value} is not a chaussette BackendInfo"
            elif (info.protocol, info.name) in builtin:
                _plugin_errors[ep.name] = f"{ep.value}: the name {info.name!r} is built in"
            else:
                found.append(info)
        _plugins = tuple(found)
    return _plugins


def all_backends() -> tuple[BackendInfo, ...]:
    return (*BACKENDS, *plugins())


def protocols() -> tuple[str, ...]:
    return tuple(dict.fromkeys(b.protocol for b in all_backends()))


DEFAULT_BACKEND = "wsgiref"


def default_backend(protocol: str) -> str:
    """The backend used when none is named: wsgiref for http, else the first one the
    registry lists for the protocol (threads: no dependency)."""
    speaking = [b.name for b in all_backends() if b.protocol == protocol]
    if not speaking or DEFAULT_BACKEND in speaking:
        return DEFAULT_BACKEND  # an unknown protocol is reported by the checks
    return speaking[0]


def lookup(protocol: str, backend: str) -> BackendInfo:
    known = all_backends()
    if protocol not in protocols():
        raise UsageError(f"--protocol {protocol}: unknown; choose from {', '.join(protocols())}")
    for info in known:
        if info.protocol == protocol and info.name == backend:
            return info
    if backend in _plugin_errors:
        raise UsageError(
            f"--backend {backend}: its plugin failed to load: {_plugin_errors[backend]}"
        )
    names = ", ".join(b.name for b in known if b.protocol == protocol)
    other = [b.protocol for b in known if b.name == backend]
    if other:
        raise UsageError(
            f"--backend {backend} does not speak --protocol {protocol}; "
            f"for {protocol} choose from {names}"
        )
    raise UsageError(f"--backend {backend}: unknown for --protocol {protocol}; choose from {names}")


def capabilities(b: BackendInfo) -> str:
    """What a backend can do, in the words of the options that use it."""
    can = []
    if b.unix:
        can.append("unix")
    if b.drain:
        can.append("drain")
    if b.threads:
        can.append("--threads")
    if b.pool:
        can.append("--spawn")
    if b.monkey:
        can.append("monkey")
    if b.websocket:
        can.append("websocket")
    if not b.keepalive:
        can.append("no-keepalive")
    if not b.chunked_input:
        can.append("no-chunked-input")
    if not b.repeated_headers:
        can.append("mixes-repeated-headers")
    if not b.listens:
        can.append("connects-out")
    return ",".join(can) or "-"


def install_hint(b: BackendInfo) -> str:
    if b.install:
        return b.install
    return f"pip install 'chaussette[{b.extra}]'" if b.extra else "(stdlib)"


def table() -> str:
    """The ``--backends`` table: every pair, installed or not, and what each can do."""
    rows = [("protocol", "backend", "installed", "can", "install", "what it is")]
    for b in all_backends():
        missing = b.missing()
        rows.append(
            (
                b.protocol,
                b.name,
                "yes" if not missing else f"no ({', '.join(missing)})",
                capabilities(b),
                install_hint(b),
                b.summary,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append(
        "can: unix = serves unix sockets; drain = finishes in-flight requests on "
        "SIGTERM/SIGHUP (without it a restart drops requests: the backend's description "
        "says what to do instead); --threads/--spawn = sized by that option; monkey = "
        "monkey-patches unless --no-monkey; websocket = serves websockets; "
        "no-keepalive = one request per connection; no-chunked-input = refuses chunked "
        "request bodies; mixes-repeated-headers = joins a repeated request header's values "
        "without a separator; connects-out = listens on nothing, connects to its server "
        "(Mongrel2 over ZeroMQ: --zeromq)"
    )
    for name, error in sorted(_plugin_errors.items()):
        lines.append(f"plugin {name!r} not loaded: {error}")
    return "\n".join(lines)
