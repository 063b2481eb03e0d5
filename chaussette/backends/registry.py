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
    unix: bool = True  # can serve a unix socket
    drain: bool = True  # finishes in-flight requests on SIGTERM
    threads: bool = False  # honours --threads
    pool: bool = False  # honours --spawn
    monkey: bool = False  # monkey-patches unless --no-monkey
    websocket: bool = False

    def missing(self) -> list[str]:
        return [mod for mod in self.requires if importlib.util.find_spec(mod) is None]

    def installed(self) -> bool:
        return not self.missing()

    def load(self) -> type[Server]:
        missing = self.missing()
        if missing:
            raise MissingDependency(f"backend {self.name!r}", missing[0], self.extra or self.name)
        module_name, _, attr = self.target.partition(":")
        module = importlib.import_module(module_name)
        server_class: type[Server] = getattr(module, attr)
        return server_class


BACKENDS: tuple[BackendInfo, ...] = (
    BackendInfo(
        "wsgiref",
        "http",
        "chaussette.backends.wsgiref:WSGIRefServer",
        "stdlib only: a bounded thread per request, no keep-alive",
        threads=True,
    ),
)

PROTOCOLS: tuple[str, ...] = tuple(dict.fromkeys(b.protocol for b in BACKENDS))


def lookup(protocol: str, backend: str) -> BackendInfo:
    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {protocol}: unknown; choose from {', '.join(PROTOCOLS)}")
    for info in BACKENDS:
        if info.protocol == protocol and info.name == backend:
            return info
    names = ", ".join(b.name for b in BACKENDS if b.protocol == protocol)
    other = [b.protocol for b in BACKENDS if b.name == backend]
    if other:
        raise UsageError(
            f"--backend {backend} does not speak --protocol {protocol}; "
            f"for {protocol} choose from {names}"
        )
    raise UsageError(f"--backend {backend}: unknown for --protocol {protocol}; choose from {names}")


def table() -> str:
    """The ``--backends`` table: every pair, installed or not."""
    rows = [("protocol", "backend", "installed", "unix", "drain", "install", "what it is")]
    for b in BACKENDS:
        missing = b.missing()
        rows.append(
            (
                b.protocol,
                b.name,
                "yes" if not missing else f"no ({', '.join(missing)})",
                "yes" if b.unix else "no",
                "yes" if b.drain else "no",
                f"pip install 'chaussette[{b.extra}]'" if b.extra else "(stdlib)",
                b.summary,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
