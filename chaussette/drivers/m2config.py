"""Where a Mongrel2 handler connects: ``--zeromq`` specs, or Mongrel2's config database.

Rules kept:

- ``--zeromq SEND_SPEC[,RECV_SPEC]`` names the two endpoints Mongrel2 binds, as in the
  handler's ``send_spec`` (Mongrel2 PUSHes requests there; we PULL) and ``recv_spec``
  (Mongrel2 SUBscribes there; we publish replies). Without RECV_SPEC, a ``tcp://`` receive
  endpoint is on the next port down (Mongrel2's own examples: 9997 and 9996).
- ``tcp://IDENT@host:port`` carries the handler's ZeroMQ identity (m2wsgi's syntax).
- ``--m2-config config.sqlite`` reads the handler from the database ``m2sh load`` writes
  (tables ``handler``, ``route``, ``host``, ``server``, ``setting``), opened read-only. The
  handler is picked by ``--m2-handler``: a ``send_ident``, a route (``/app``), a host and
  route (``example.com/app``) or a host name; with one handler in the database, none is
  needed. A bind address (``*``, ``0.0.0.0``, ``::``) becomes loopback to connect to.
- The upload directory is derived from the ``upload.temp_store`` setting and the server's
  ``chroot``, taken relative to the database's directory (``m2sh start`` and the usual
  deployments run Mongrel2 there). Upload paths in messages are relative to that root.
- Mongrel2 spools a body to a file only when its Content-Length exceeds the
  ``limits.content_length`` setting (``DEFAULT_CONTENT_LIMIT`` when unset): read from the
  database with ``--m2-config``, assumed to be the default otherwise. The driver takes an
  upload message with a smaller (or no) Content-Length for a forged one.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from urllib.parse import quote

from chaussette.errors import UsageError

DEFAULT_CONTENT_LIMIT = 20480  # Mongrel2's limits.content_length when the setting is unset
_ANY_HOSTS = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}


@dataclass(frozen=True)
class Endpoints:
    send_spec: str  # Mongrel2's PUSH: we connect a PULL here
    recv_spec: str  # Mongrel2's SUB: we connect our publisher here
    identity: str | None = None


@dataclass(frozen=True)
class UploadPlace:
    """Where async uploads may be: ``directory`` (None: uploads refused), the root
    relative upload paths in messages resolve against (None: the working directory), and
    Mongrel2's ``limits.content_length``: only a body longer than that is spooled."""

    directory: str | None
    root: str | None = None
    content_limit: int = DEFAULT_CONTENT_LIMIT


@dataclass(frozen=True)
class HandlerConfig:
    endpoints: Endpoints
    send_ident: str
    protocol: str  # "json" or "tnetstring" (the core detects either anyway)
    upload: UploadPlace
    description: str  # for the startup line


def split_identity(spec: str) -> tuple[str, str | None]:
    """``tcp://IDENT@host:port`` -> (``tcp://host:port``, ``IDENT``)."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        raise ValueError(f"{spec!r} is not an endpoint like tcp://127.0.0.1:9997")
    if scheme == "tcp" and "@" in rest:
        ident, _, address = rest.rpartition("@")
        if not ident:
            raise ValueError(f"{spec!r}: empty identity before '@'")
        return f"{scheme}://{address}", ident
    return spec, None


def _tcp_port(spec: str) -> tuple[str, int]:
    address = spec[len("tcp://") :]
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{spec!r}: expected tcp://host:port")
    return host, int(port_text)


def connectable(spec: str) -> str:
    """An endpoint Mongrel2 binds, as an address to connect to."""
    if spec.startswith("tcp://"):
        host, port = _tcp_port(spec)
        host = _ANY_HOSTS.get(host, host)
        return f"tcp://{host}:{port}"
    if spec.startswith(("ipc://", "inproc://")):
        return spec
    raise ValueError(f"{spec!r}: only tcp://, ipc:// and inproc:// endpoints are supported")


def parse_zeromq(text: str) -> Endpoints:
    """``SEND_SPEC[,RECV_SPEC]`` -> Endpoints; ValueError naming the problem."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 2 or not all(parts):
        raise ValueError("expected SEND_SPEC or SEND_SPEC,RECV_SPEC")
    send, send_ident = split_identity(parts[0])
    send = connectable(send)
    if len(parts) == 2:
        recv, recv_ident = split_identity(parts[1])
        recv = connectable(recv)
    else:
        if not send.startswith("tcp://"):
            raise ValueError("RECV_SPEC can be left out for tcp:// only (the next port down)")
        host, port = _tcp_port(send)
        if port <= 1:
            raise ValueError("no port below the send port for RECV_SPEC: give it")
        recv, recv_ident = f"tcp://{host}:{port - 1}", None
    if send_ident and recv_ident and send_ident != recv_ident:
        raise ValueError(f"two identities: {send_ident!r} and {recv_ident!r}")
    return Endpoints(send, recv, send_ident or recv_ident)


# -- the config database --


@dataclass(frozen=True)
class _Handler:
    id: int
    send_spec: str
    send_ident: str
    recv_spec: str
    protocol: str


@dataclass(frozen=True)
class _Route:
    path: str
    host: str
    server_id: int
    handler_id: int


def _open(path: str) -> sqlite3.Connection:
    if not os.path.isfile(path):
        raise UsageError(f"--m2-config {path}: no such file (make it with m2sh load)")
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise UsageError(f"--m2-config {path}: cannot open ({exc})") from None


def _read(path: str) -> tuple[list[_Handler], list[_Route], dict[int, str], dict[str, str]]:
    db = _open(path)
    try:
        handlers = [
            _Handler(int(row[0]), *(str(v or "") for v in row[1:]))
            for row in db.execute(
                "SELECT id, send_spec, send_ident, recv_spec, protocol FROM handler ORDER BY id"
            )
        ]
        routes = [
            _Route(str(row[0]), str(row[1] or ""), int(row[2] or 0), int(row[3]))
            for row in db.execute(
                "SELECT route.path, host.name, host.server_id, route.target_id FROM route "
                "JOIN host ON route.host_id = host.id WHERE route.target_type = 'handler' "
                "ORDER BY route.id"
            )
        ]
        chroots = {int(r[0]): str(r[1] or "") for r in db.execute("SELECT id, chroot FROM server")}
        settings = {str(r[0]): str(r[1]) for r in db.execute("SELECT key, value FROM setting")}
    except sqlite3.Error as exc:
        raise UsageError(
            f"--m2-config {path}: not a Mongrel2 config database ({exc}); make it with m2sh load"
        ) from None
    finally:
        db.close()
    return handlers, routes, chroots, settings


def _describe(handler: _Handler, routes: list[_Route]) -> str:
    where = ", ".join(f"{r.host}{r.path}" for r in routes if r.handler_id == handler.id)
    return f"{handler.send_ident or handler.send_spec} ({where or 'no route'})"


def _select(
    path: str, selector: str | None, handlers: list[_Handler], routes: list[_Route]
) -> _Handler:
    if not handlers:
        raise UsageError(f"--m2-config {path}: the database has no handler")
    known = "; ".join(_describe(h, routes) for h in handlers)
    if not selector:
        if len(handlers) == 1:
            return handlers[0]
        raise UsageError(
            f"--m2-config {path} has {len(handlers)} handlers: pick one with --m2-handler "
            f"(a send_ident, /route, host/route or host): {known}"
        )
    by_ident = [h for h in handlers if h.send_ident == selector]
    if by_ident:
        return by_ident[0]
    if selector.startswith("/"):
        chosen = {r.handler_id for r in routes if r.path == selector}
    elif "/" in selector:
        host, _, route = selector.partition("/")
        chosen = {r.handler_id for r in routes if r.host == host and r.path == "/" + route}
    else:
        chosen = {r.handler_id for r in routes if r.host == selector}
    if len(chosen) > 1:
        raise UsageError(
            f"--m2-handler {selector}: {len(chosen)} handlers match; be more precise: {known}"
        )
    if not chosen:
        raise UsageError(f"--m2-handler {selector}: no handler matches in {path}: {known}")
    wanted = chosen.pop()
    return next(h for h in handlers if h.id == wanted)


def _upload_place(
    path: str,
    handler: _Handler,
    routes: list[_Route],
    chroots: dict[int, str],
    store: str | None,
    limit: int,
) -> UploadPlace:
    if not store:
        return UploadPlace(None, content_limit=limit)
    servers = [r.server_id for r in routes if r.handler_id == handler.id]
    chroot = chroots.get(servers[0], "") if servers else ""
    if not chroot and len(chroots) == 1:
        chroot = next(iter(chroots.values()))
    base = os.path.dirname(os.path.abspath(path))
    root = os.path.normpath(os.path.join(base, chroot or "."))
    # Mongrel2 opens its temp_store inside its root (an absolute one too, once chrooted)
    directory = os.path.dirname(os.path.join(root, store.lstrip("/")))
    return UploadPlace(os.path.realpath(directory), root, limit)


def _content_limit(path: str, value: str | None) -> int:
    """Mongrel2's ``limits.content_length`` (it reads the setting as a decimal integer)."""
    if value is None:
        return DEFAULT_CONTENT_LIMIT
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"--m2-config {path}: limits.content_length {value!r} is not a number")
    return int(text)


def load_handler(path: str, selector: str | None) -> HandlerConfig:
    """The handler ``selector`` picks in Mongrel2's config database at ``path``."""
    handlers, routes, chroots, settings = _read(path)
    handler = _select(path, selector, handlers, routes)
    try:
        send = connectable(handler.send_spec)
        recv = connectable(handler.recv_spec)
    except ValueError as exc:
        raise UsageError(f"--m2-config {path}: handler {handler.send_ident}: {exc}") from None
    limit = _content_limit(path, settings.get("limits.content_length"))
    store = settings.get("upload.temp_store")
    upload = _upload_place(path, handler, routes, chroots, store, limit)
    return HandlerConfig(
        Endpoints(send, recv),
        handler.send_ident,
        handler.protocol or "json",
        upload,
        _describe(handler, routes),
    )
