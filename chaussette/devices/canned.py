"""A canned response device: a Mongrel2 handler that answers every request with one fixed
response, with values from the request interpolated into it.

For maintenance pages, health checks, redirects of a whole host, and as the floor of what
a Python handler costs::

    python -m chaussette.devices.canned --zeromq tcp://127.0.0.1:9997 \\
        --status "503 Service Unavailable" --header "Retry-After: 120" \\
        --header "Content-Type: text/html; charset=utf-8" \\
        --body "<p>{host|html} is down for maintenance; {path|html} will be back.</p>"

Templates (status, header values, body) hold ``{variable}`` or ``{variable|filter}``;
``{{`` and ``}}`` are literal braces. Variables: ``method``, ``path``, ``query``, ``uri``,
``version``, ``scheme``, ``remote_addr``, ``pattern``, ``host``, ``conn_id``, ``sender``,
``body_length`` and ``header:NAME`` (any request header, repeated ones joined with ``", "``;
empty when absent). The one filter is ``html`` (escapes ``<>&"'``). The templates are
parsed once at startup, and an unknown variable, filter or a lone brace is a usage error:
nothing in a template is ever evaluated (no ``str.format``, no attribute or index lookup).

Rules it keeps:

- Values are the request's bytes as the client sent them (latin-1 text). In a header they
  lose every control character (CR and LF included: no header injection); in the body they
  go in as they are -- use ``|html`` in an HTML body.
- Content-Length is computed; HEAD gets the headers only; the status line and keep-alive
  follow the client's HTTP version, and the connection is closed when HTTP says so.
- Disconnect notices are ignored. An async upload is answered when its upload-done
  message comes (the spool file is left to Mongrel2's temp store: this device reads and
  deletes no file whatever a header says); upload headers Mongrel2 cannot have produced
  get a 400. Malformed messages are dropped and logged.
"""

from __future__ import annotations

import argparse
import html
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from chaussette.devices import common
from chaussette.devices.common import Endpoint
from chaussette.errors import UsageError
from chaussette.protocols import mongrel2
from chaussette.protocols.errors import RemoteProtocolError

log = logging.getLogger("chaussette.devices.canned")

LINGER_MS = 1000
MAX_MESSAGE = 64 * 1024 * 1024

_SERVER_KEYS = {
    "method": "METHOD",
    "path": "PATH",
    "query": "QUERY",
    "uri": "URI",
    "version": "VERSION",
    "remote_addr": "REMOTE_ADDR",
    "pattern": "PATTERN",
}
VARIABLES = (*_SERVER_KEYS, "scheme", "host", "conn_id", "sender", "body_length", "header")
FILTERS: dict[str, Callable[[str], str]] = {"html": html.escape}
RESERVED_HEADERS = frozenset(("content-length", "transfer-encoding", "connection"))

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD = re.compile(r"(?P<name>[a-z_]+)(?::(?P<arg>[A-Za-z0-9-]+))?(?:\|(?P<filter>[a-z]+))?\Z")
_STATUS = re.compile(r"[1-5][0-9][0-9] [^\x00-\x1f\x7f]*\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Field:
    name: str
    arg: str | None
    filter: str | None

    def value(self, request: mongrel2.Request) -> str:
        if self.name == "header":
            assert self.arg is not None
            text = request.header(self.arg.lower()) or ""
        elif self.name in _SERVER_KEYS:
            text = request.header(_SERVER_KEYS[self.name]) or ""
        elif self.name == "scheme":
            text = mongrel2.url_scheme(request)
        elif self.name == "host":
            text = request.header("host") or ""
        elif self.name == "conn_id":
            text = request.conn_id
        elif self.name == "sender":
            text = request.sender
        else:  # body_length
            text = str(len(request.body))
        return FILTERS[self.filter](text) if self.filter else text


class Template:
    """A parsed template: literal text and fields, rendered without any evaluation."""

    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.parts: list[str | Field] = []
        pos = 0
        for match in _TOKEN.finditer(text):
            if match.start() > pos:
                self.parts.append(text[pos : match.start()])
            token = match.group(0)
            if token in ("{{", "}}"):
                self.parts.append(token[0])
            elif match.group(1) is None:
                raise UsageError(f"{what} {text!r}: lone {token!r} (write {token * 2} for one)")
            else:
                self.parts.append(_field(match.group(1), text, what))
            pos = match.end()
        if pos < len(text):
            self.parts.append(text[pos:])

    @property
    def fields(self) -> list[Field]:
        return [p for p in self.parts if isinstance(p, Field)]

    def render(self, request: mongrel2.Request, clean: Callable[[str], str] = str) -> str:
        """The text; each value passes through ``clean`` (header values lose controls)."""
        return "".join(p if isinstance(p, str) else clean(p.value(request)) for p in self.parts)

    def render_bytes(self, request: mongrel2.Request) -> bytes:
        """Literal text as UTF-8, values as the bytes the client sent (latin-1)."""
        return b"".join(
            p.encode("utf-8") if isinstance(p, str) else p.value(request).encode("latin-1")
            for p in self.parts
        )


def _field(inner: str, text: str, what: str) -> Field:
    match = _FIELD.match(inner.strip())
    if match is None:
        raise UsageError(
            f"{what} {text!r}: {{{inner}}} is not a variable (NAME, header:NAME, NAME|html)"
        )
    name, arg, filt = match["name"], match["arg"], match["filter"]
    if name not in VARIABLES:
        raise UsageError(
            f"{what} {text!r}: unknown variable {name!r} (known: {', '.join(VARIABLES)})"
        )
    if (name == "header") != (arg is not None):
        raise UsageError(f"{what} {text!r}: write {{header:NAME}}; only header takes a name")
    if filt is not None and filt not in FILTERS:
        raise UsageError(f"{what} {text!r}: unknown filter {filt!r} (known: html)")
    return Field(name, arg, filt)


def _no_controls(value: str) -> str:
    return _CONTROL.sub("", value)


class CannedResponse:
    """The response, parsed and checked once; ``render(request)`` gives the HTTP bytes."""

    def __init__(self, status: str, headers: Sequence[str], body: str) -> None:
        self.status = Template(status, "--status")
        if not _latin1(status):
            raise UsageError(f"--status {status!r}: a status line is latin-1 text")
        if not self.status.fields and not _STATUS.match(status):
            raise UsageError(f"--status {status!r}: expected 'NNN Reason', e.g. '200 OK'")
        self.headers: list[tuple[str, Template]] = []
        for line in headers:
            name, sep, value = line.partition(":")
            name = name.strip()
            if not sep or not _HEADER_NAME.match(name):
                raise UsageError(f"--header {line!r}: expected 'Name: value'")
            if name.lower() in RESERVED_HEADERS:
                raise UsageError(f"--header {line!r}: {name} is set by the device itself")
            if _CONTROL.search(value) or not _latin1(value):
                raise UsageError(f"--header {line!r}: control or non-latin-1 characters")
            self.headers.append((name, Template(value.strip(), "--header")))
        if not any(name.lower() == "content-type" for name, _ in self.headers):
            self.headers.insert(0, ("Content-Type", Template("text/plain; charset=utf-8", "")))
        self.body = Template(body, "--body")

    def render(self, request: mongrel2.Request) -> tuple[bytes, bool]:
        """The HTTP response for ``request`` and whether to close the connection after."""
        status = self.status.render(request, _no_controls)
        if not _STATUS.match(status) or not _latin1(status):
            status = "500 Internal Server Error"  # a template made it invalid
        body = self.body.render_bytes(request)
        headers = [(name, t.render(request, _no_controls)) for name, t in self.headers]
        return self._response(request, status, headers, body)

    @staticmethod
    def _response(
        request: mongrel2.Request, status: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[bytes, bool]:
        close = not mongrel2.keep_alive(request)
        if status[:3] in ("204", "304") or status.startswith("1"):
            body = b""
        else:
            headers = [*headers, ("Content-Length", str(len(body)))]
        head = mongrel2.response_head(request, status, headers, chunked=False, close=close)
        if request.header("METHOD") == "HEAD":
            body = b""
        return head + body, close


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


BAD_REQUEST = (
    "400 Bad Request",
    [("Content-Type", "text/plain; charset=utf-8")],
    b"Bad Request\n",
)


class Canned:
    """The device: PULL requests from Mongrel2, PUB the canned answers back."""

    def __init__(
        self, upstream: tuple[Endpoint, Endpoint], response: CannedResponse, context: Any = None
    ) -> None:
        zmq = common.import_zmq("the canned response device")
        self.zmq = zmq
        self.response = response
        self.endpoints = upstream
        self.own_context = context is None
        self.context = context or zmq.Context()
        self.requests = self.context.socket(zmq.PULL)
        self.replies = self.context.socket(zmq.PUB)
        for sock in (self.requests, self.replies):
            sock.setsockopt(zmq.LINGER, LINGER_MS)
        self.requests.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        send, recv = upstream
        if send.identity:
            self.requests.setsockopt(zmq.IDENTITY, send.identity.encode())
        self.requests.connect(send.address)
        self.replies.connect(recv.address)
        self.answered = 0

    def close(self) -> None:
        self.requests.close()
        self.replies.close()
        if self.own_context:
            self.context.term()

    def run(self, stopping: Callable[[], bool]) -> int:
        log.info(
            "answering requests from %s (replies to %s) with %r",
            self.endpoints[0].address,
            self.endpoints[1].address,
            self.response.status.text,
        )
        while not stopping():
            if not self.requests.poll(common.POLL_MS, self.zmq.POLLIN):
                continue
            for _ in range(256):
                try:
                    msg = self.requests.recv(self.zmq.NOBLOCK)
                except self.zmq.Again:
                    break
                try:
                    self.handle(msg)
                except Exception:  # one bad message must not stop the device
                    log.exception("could not answer a message from Mongrel2")
        log.info("stopping after %d responses", self.answered)
        return 0

    def handle(self, msg: bytes) -> None:
        try:
            request = mongrel2.parse_request(msg)
        except RemoteProtocolError as exc:
            log.warning("dropped a malformed message from Mongrel2: %s", exc)
            return
        if request.is_disconnect:
            return
        try:
            stage = mongrel2.upload_stage(request)
        except mongrel2.UploadError as exc:
            log.warning("connection %s: %s: 400", request.conn_id, exc)
            payload, close = CannedResponse._response(request, *BAD_REQUEST)
        else:
            if stage == "start":
                return  # answered when the upload is complete
            payload, close = self.response.render(request)
        self.replies.send(mongrel2.encode_reply(request.sender, [request.conn_id], payload))
        if close:
            self.replies.send(mongrel2.encode_reply(request.sender, [request.conn_id], b""))
        self.answered += 1


# -- the command line --


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(
        "chaussette-canned",
        "Answer every Mongrel2 request with one fixed response, with {variables} from the "
        "request interpolated.",
    )
    p.add_argument(
        "--zeromq",
        required=True,
        metavar="SEND_SPEC[,RECV_SPEC]",
        help="Mongrel2's send_spec and recv_spec; RECV_SPEC defaults to the next port down",
    )
    p.add_argument("--status", default="200 OK", help="status line template (200 OK)")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: TEMPLATE'",
        help="a response header (repeatable); Content-Type defaults to text/plain",
    )
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", default="", help="body template")
    body.add_argument("--body-file", metavar="PATH", help="read the body template (UTF-8)")
    return p


def run(args: argparse.Namespace, stopping: Callable[[], bool]) -> int:
    upstream = common.parse_pair(args.zeromq, "--zeromq")
    body = args.body
    if args.body_file:
        try:
            with open(args.body_file, encoding="utf-8") as f:
                body = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--body-file {args.body_file}: {exc}") from None
    response = CannedResponse(args.status, args.header, body)
    device = Canned(upstream, response)
    try:
        return device.run(stopping)
    finally:
        device.close()


def main(argv: Sequence[str] | None = None) -> int:
    return common.main("chaussette-canned", build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
