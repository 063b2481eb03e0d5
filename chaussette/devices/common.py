"""What the devices share: ZeroMQ endpoint specs, a one-line-error command line, the stop
signals and the pyzmq import."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import Any, NoReturn

from chaussette.errors import EXIT_USAGE, ChaussetteError, MissingDependency, UsageError

log = logging.getLogger("chaussette.devices")

_ENDPOINT = re.compile(r"(?P<scheme>tcp|ipc|inproc)://(?:(?P<ident>[^@/]+)@)?(?P<rest>.+)\Z")
POLL_MS = 200  # how often a device loop looks at the stop flag


@dataclass(frozen=True)
class Endpoint:
    """A ZeroMQ address with an optional socket identity (``tcp://IDENT@host:port``)."""

    address: str
    identity: str | None = None

    def __str__(self) -> str:
        return self.address


def parse_endpoint(spec: str, what: str) -> Endpoint:
    """``tcp://[IDENT@]host:port``, ``ipc://[IDENT@]path`` or ``inproc://name``."""
    match = _ENDPOINT.match(spec.strip())
    if match is None:
        raise UsageError(
            f"{what} {spec!r}: not a ZeroMQ endpoint (tcp://host:port, ipc://path, "
            "with an optional IDENT@ before the address)"
        )
    scheme, ident, rest = match["scheme"], match["ident"], match["rest"]
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not (port.isdigit() or port == "*"):
            raise UsageError(f"{what} {spec!r}: a tcp endpoint needs host:port")
    return Endpoint(f"{scheme}://{rest}", ident)


def parse_pair(spec: str, what: str) -> tuple[Endpoint, Endpoint]:
    """``SEND[,RECV]``: Mongrel2's send_spec and recv_spec, as the handler's ``--zeromq``
    reads them (RECV defaults to the next port down from SEND)."""
    from chaussette.drivers.m2config import parse_zeromq

    try:
        endpoints = parse_zeromq(spec)
    except ValueError as exc:
        raise UsageError(f"{what} {spec!r}: {exc}") from None
    return (
        Endpoint(endpoints.send_spec, endpoints.identity),
        Endpoint(endpoints.recv_spec, endpoints.identity),
    )


def import_zmq(what: str) -> ModuleType:
    try:
        import zmq
    except ImportError:
        raise MissingDependency(what, "pyzmq", "mongrel2") from None
    return zmq


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as chaussette's own."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (default: info)",
    )
    return p


def main(
    prog: str,
    build: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace, Callable[[], bool]], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, set up logging, and ``run(args, stopping)`` until SIGTERM/SIGINT;
    a ChaussetteError becomes one line and its exit code."""
    args = build().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s [%(process)d] [%(levelname)s] {prog}: %(message)s",
        stream=sys.stderr,
    )
    stop = _Stop()
    try:
        with stop:
            return run(args, stop.requested)
    except ChaussetteError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130


class _Stop:
    """SIGTERM and SIGINT only record; the device loop looks at ``requested()``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: out now
        self.signum = signum

    def __enter__(self) -> _Stop:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
