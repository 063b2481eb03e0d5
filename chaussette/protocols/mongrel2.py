"""Mongrel2 handler messages, sans-I/O: requests in, replies out, the CGI environ.

Rules this module keeps (Mongrel2 1.12 as it behaves on the wire, see tests/data/README.txt):

- A request is one ZeroMQ message ``SENDER CONN_ID PATH HEADERS BODY``: the server's UUID,
  the connection id (decimal digits), the request path, then HEADERS and BODY back to back.
  HEADERS is a tnetstring dict (handler ``protocol='tnetstring'``) or a netstring holding a
  JSON object (``protocol='json'``); the last byte of HEADERS (``}`` or ``,``) tells which,
  so both are accepted without configuration. BODY is a netstring. Nothing may follow it.
- Header keys are Mongrel2's own in upper case (METHOD, PATH, VERSION, URI, QUERY, PATTERN,
  URL_SCHEME, REMOTE_ADDR...) and the client's headers lower-cased. A header the client sent
  more than once is a list of values. Values are text; bytes are decoded latin-1 (so a value
  is the exact bytes the client sent, as WSGI wants), and the JSON text is decoded latin-1
  before JSON parsing for the same reason.
- A disconnect notice is METHOD ``JSON`` with body ``{"type":"disconnect"}`` (path ``@*``).
- A body over Mongrel2's ``limits.content_length`` arrives as two messages: one with an
  ``x-mongrel2-upload-start`` header naming the spool file (empty body), and, once it is
  complete, one with both that header and ``x-mongrel2-upload-done``. Mongrel2 passes
  client-sent headers of those names through unchanged (it replaces only the start header,
  and only when it spools the body itself): ``upload_stage`` rejects the combinations
  Mongrel2 never produces, and the driver must still check the path lies in its upload
  directory.
- A reply is ``SENDER LEN:ID1 ID2...,`` + a space + raw HTTP bytes for those connections;
  an empty payload asks Mongrel2 to close them. Mongrel2 never closes a connection by
  itself after a response: ``keep_alive`` says when the handler must.

The environ rule (``environ_from_request``), SCRIPT_NAME and PATH_INFO:

- The mount point is the route PATTERN up to its first ``(`` (where Mongrel2's pattern
  syntax starts), without trailing slashes: route ``/app``, ``/app/`` and ``/app/(.*)`` all
  mount at ``/app``; route ``/`` (or none) mounts at the root.
- If PATH is the mount point itself or continues it with ``/``, SCRIPT_NAME is the mount
  point and PATH_INFO the rest of PATH (``/app`` -> ``""``; ``/app/x`` -> ``/x``). Otherwise
  (root mount, a route ``/app`` matching ``/apple``, a host-only route) SCRIPT_NAME is ``""``
  and PATH_INFO the whole PATH.
- Both are then percent-decoded (the split is made on the raw path, so an encoded ``%2F``
  can never move the boundary) and given as latin-1 text of the decoded bytes, per PEP 3333.
  QUERY_STRING is Mongrel2's QUERY, raw (not decoded); REQUEST_URI is its URI, raw.
- SERVER_NAME and SERVER_PORT come from the Host header (default port by URL scheme);
  without one they are ``localhost`` and the scheme's port. CONTENT_TYPE and CONTENT_LENGTH
  from their headers (CONTENT_LENGTH from the body's size when the client sent none and the
  body is not empty). Every other client header is ``HTTP_`` + its name upper-cased with
  ``-`` as ``_``; repeated ones are joined with ``", "`` (cookie with ``"; "``). Headers whose
  name holds anything but letters, digits and ``-`` are dropped (``x_user`` would otherwise
  pass for ``x-user``), and so are the ``x-mongrel2-upload-*`` ones.
"""

from __future__ import annotations

import json as _json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from . import tnetstring
from .errors import RemoteProtocolError

__all__ = [
    "LAST_CHUNK",
    "UPLOAD_DONE",
    "UPLOAD_START",
    "Request",
    "UploadError",
    "encode_chunk",
    "encode_reply",
    "encode_request",
    "environ_from_request",
    "keep_alive",
    "parse_reply",
    "parse_request",
    "response_head",
    "upload_stage",
    "url_scheme",
    "wsgi_environ",
]

UPLOAD_START = "x-mongrel2-upload-start"
UPLOAD_DONE = "x-mongrel2-upload-done"
LAST_CHUNK = b"0\r\n\r\n"
DEFAULT_MAX_BODY_SIZE = tnetstring.MAX_LENGTH

_MAX_CONN_ID_DIGITS = 20
_MAX_SENDER_LEN = 256
_DISCONNECT = {"type": "disconnect"}
_HEADER_NAME = re.compile(r"[a-z0-9-]+\Z")
_IDENT = re.compile(rb"[0-9]{1,20}\Z")
_SERVER_KEYS = frozenset(
    ("METHOD", "PATH", "VERSION", "URI", "QUERY", "PATTERN", "URL_SCHEME", "REMOTE_ADDR")
)


# --------------------------------------------------------------------------- requests


@dataclass(slots=True)
class Request:
    """One request message, parsed. ``headers`` are as Mongrel2 sent them."""

    sender: str  # the handler's send_ident (echo it in replies)
    conn_id: str  # decimal digits
    path: str  # raw (percent-encoded), latin-1
    headers: dict[str, str | list[str]]  # keys as sent; repeated headers are lists
    body: bytes  # empty for upload messages (the body is in the file)

    @property
    def is_disconnect(self) -> bool:
        """Mongrel2's notice that the client connection ``conn_id`` is gone."""
        if self.headers.get("METHOD") != "JSON":
            return False
        try:
            return bool(_json.loads(self.body) == _DISCONNECT)
        except ValueError:
            return False

    @property
    def upload_start(self) -> str | None:
        """The spool file named by ``x-mongrel2-upload-start``, or None.

        A header the client repeated comes back joined with ``", "`` (it cannot name a file
        Mongrel2 created); the driver must check the path lies in the upload directory.
        """
        return _single(self.headers.get(UPLOAD_START))

    @property
    def upload_done(self) -> str | None:
        """The spool file named by ``x-mongrel2-upload-done``, or None (see upload_start)."""
        return _single(self.headers.get(UPLOAD_DONE))

    def header(self, name: str) -> str | None:
        """A header's value, repeated ones joined with ``", "``; None if absent."""
        return _single(self.headers.get(name))


def _single(value: str | list[str] | None) -> str | None:
    if value is None or type(value) is str:
        return value
    return ", ".join(value)


class UploadError(RemoteProtocolError):
    """The upload headers are not a combination Mongrel2 produces (a forged header)."""


def upload_stage(request: Request) -> str | None:
    """``"start"``, ``"done"`` or None (an ordinary request), from the upload headers.

    UploadError (answer 400) when they cannot have come from Mongrel2 alone: a repeated
    header, an empty path, ``done`` without ``start`` or naming another file, or a body in
    the message (Mongrel2 sends the body in the file, never inline). Seen on 1.12.2: a client
    sending both headers with a small body gets both through as it wrote them; with a body
    big enough to spool, Mongrel2 overwrites the start header but the client's done header
    reaches the handler in the start message. The path itself is the driver's to check.
    """
    start = request.headers.get(UPLOAD_START)
    done = request.headers.get(UPLOAD_DONE)
    if start is None and done is None:
        return None
    if type(start) is list or type(done) is list:
        raise UploadError("repeated x-mongrel2-upload-* header")
    if not start:
        raise UploadError("x-mongrel2-upload-done without x-mongrel2-upload-start")
    if request.body:
        raise UploadError("upload message with an inline body")
    if done is None:
        return "start"
    if done != start:
        raise UploadError("x-mongrel2-upload-done names another file than the start")
    return "done"


def parse_request(
    msg: tnetstring.Buffer,
    *,
    max_headers_size: int = 65536,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
) -> Request:
    """Parse one request message (tnetstring or JSON headers, detected).

    RemoteProtocolError on anything malformed or over the bounds.
    """
    msg = bytes(msg)
    fast = _fast_request(msg, max_headers_size, max_body_size)
    if fast is not None:
        return fast
    return _parse_request(msg, max_headers_size, max_body_size)


# The fast path: Mongrel2's usual message, read with a few calls into C. It accepts exactly
# what the general path (``_parse_request``) accepts and gives the same Request; anything
# else (a repeated header, a non-ASCII header name, a malformed message...) is left to the
# general path, which gives the value or the precise error.
#
# SENDER CONN_ID PATH and the headers' length (digits, no leading zero)
_ENVELOPE = re.compile(
    rb"([^ ]{1,%d}) ([0-9]{1,%d}) ([^ ]+) (0|[1-9][0-9]{0,9}):"
    % (_MAX_SENDER_LEN, _MAX_CONN_ID_DIGITS)
)
_LENGTH = re.compile(rb"(0|[1-9][0-9]{0,9}):")
# one JSON value at an offset, no whitespace skipped: json.loads' own scanner (C)
_JSON_SCAN = _json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _fast_request(msg: bytes, max_headers_size: int, max_body_size: int) -> Request | None:
    match = _ENVELOPE.match(msg)
    if match is None:
        return None
    start = match.end()
    stop = start + int(match.group(4))  # the headers' tag
    if stop >= len(msg) - 3 or stop - start > max_headers_size:
        return None
    head = msg[:stop].decode("latin-1")  # all but the tag and the body, as text
    tag = msg[stop]
    headers: dict[str, str | list[str]] | None
    if tag == 0x7D:  # }
        headers = _flat_dict(head[start:])
    elif tag == 0x2C:  # ,
        headers = _scan_json(head[start:])
    else:
        return None
    if headers is None:
        return None
    # the body: ``LEN:BYTES,`` ending the message
    if stop + 4 == len(msg) and msg.endswith(b"0:,"):
        body = b""
    else:
        match = _LENGTH.match(msg, stop + 1)
        if match is None:
            return None
        begin = match.end()
        end = begin + int(match.group(1))
        if end != len(msg) - 1 or msg[end] != 0x2C or end - begin > max_body_size:
            return None
        body = msg[begin:end]
    sender, conn_id, path, _ = head[:start].split(" ")
    return Request(sender, conn_id, path, headers, body)


_LENGTHS = tuple(str(n) for n in range(1024))  # the canonical digits of a length
# "LEN:NAME" -> NAME for the header names seen so far (valid, ASCII); bounded, since a
# client chooses them (past the bound, a name is checked each time)
_KEY_ITEMS: dict[str, str] = {}
_MAX_KEY_ITEMS = 512
_MAX_KEY_ITEM = 64


def _flat_dict(payload: str) -> dict[str, str | list[str]] | None:
    """A tnetstring dict's payload (latin-1 text) of string items only, with ASCII keys,
    as headers; None for anything else (left to the general parser).

    Split at every comma, then each item is read from its piece, ``LEN:BYTES``; an item
    whose bytes hold a comma spans several pieces (``_spanning``). The byte after an item
    is then always a comma, its tag; an item of another type (its tag is not a comma)
    never adds up to its length exactly."""
    pieces = payload.split(",")
    if pieces.pop():  # the payload must end with an item's comma
        return None
    headers: dict[str, str | list[str]] = {}
    lengths = _LENGTHS
    known = _KEY_ITEMS
    rest = iter(pieces)
    spanned = 0  # pieces joined to the one before (commas inside values)
    try:
        for piece in rest:
            key = known.get(piece)
            if key is None:
                digits, colon, key = piece.partition(":")
                if not (colon and key.isascii() and len(key) < 1024) or (
                    digits != lengths[len(key)]
                ):
                    return None
                if len(piece) <= _MAX_KEY_ITEM and len(known) < _MAX_KEY_ITEMS:
                    known[piece] = key
            digits, colon, value = next(rest).partition(":")
            if len(value) >= 1024 or digits != lengths[len(value)] or not colon:
                if not colon:  # "0" would pass for "0:"
                    return None
                span = _spanning(digits, value, rest)
                if span is None:
                    return None
                value, joined = span
                spanned += joined
            headers[key] = value
    except StopIteration:  # a key without a value
        return None
    if len(headers) * 2 + spanned != len(pieces):  # a repeated key
        return None
    return headers


def _spanning(digits: str, data: str, rest: Iterator[str]) -> tuple[str, int] | None:
    """A string item longer than the table of lengths or holding commas: its bytes and how
    many more pieces they took from ``rest``; None if it is not a string item."""
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 10):
        return None
    if digits[0] == "0" and len(digits) > 1:
        return None
    size = int(digits)
    total = len(data)
    if total == size:
        return data, 0
    parts = [data]
    while total < size:
        more = next(rest, None)
        if more is None:
            return None
        parts.append(more)
        total += 1 + len(more)
    if total != size:
        return None
    return ",".join(parts), len(parts) - 1


def _scan_json(text: str) -> dict[str, str | list[str]] | None:
    """JSON headers as Mongrel2 writes them (an object, no whitespace around it), or None
    (left to ``_json_headers``, which gives the error or reads what this does not)."""
    try:
        value, end = _JSON_SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return None
    if end != len(text) or type(value) is not dict:
        return None
    for item in value.values():
        if type(item) is not str and not (
            type(item) is list and item and all(type(v) is str for v in item)
        ):
            return None
    return value


def _parse_request(msg: bytes, max_headers_size: int, max_body_size: int) -> Request:
    """The general path: any message, the value or the precise error."""
    # three spaces, found without splitting (which would copy the body)
    space1 = msg.find(b" ", 0, _MAX_SENDER_LEN + 1)
    space2 = msg.find(b" ", space1 + 1, space1 + 2 + _MAX_CONN_ID_DIGITS) if space1 > 0 else -1
    space3 = msg.find(b" ", space2 + 1) if space2 > 0 else -1
    if space3 < 0:
        if space1 == 0 or (space1 < 0 and len(msg) > _MAX_SENDER_LEN):
            raise RemoteProtocolError("Mongrel2 message: empty or oversized sender")
        raise RemoteProtocolError("Mongrel2 message: expected SENDER CONN_ID PATH HEADERS BODY")
    raw_sender = msg[:space1]
    raw_conn = msg[space1 + 1 : space2]
    raw_path = msg[space2 + 1 : space3]
    if not _IDENT.match(raw_conn):
        raise RemoteProtocolError(f"Mongrel2 message: bad connection id {raw_conn[:24]!r}")
    if not raw_path:
        raise RemoteProtocolError("Mongrel2 message: empty path")
    try:
        raw_headers, pos = tnetstring.parse_at(
            msg, space3 + 1, max_length=max_headers_size, max_depth=2
        )
        if type(raw_headers) is bytes:
            headers = _json_headers(raw_headers)
        elif type(raw_headers) is dict:
            headers = _tnet_headers(raw_headers)
        else:
            raise RemoteProtocolError("Mongrel2 message: headers are neither a dict nor JSON")
        body, pos = tnetstring.parse_at(msg, pos, max_length=max_body_size, max_depth=0)
    except tnetstring.TNetstringError as exc:
        raise RemoteProtocolError(f"Mongrel2 message: {exc}") from None
    if type(body) is not bytes:
        raise RemoteProtocolError("Mongrel2 message: the body is not a netstring")
    if pos != len(msg):
        raise RemoteProtocolError(f"Mongrel2 message: {len(msg) - pos} bytes after the body")
    return Request(
        raw_sender.decode("latin-1"),
        raw_conn.decode("ascii"),
        raw_path.decode("latin-1"),
        headers,
        body,
    )


def _tnet_headers(raw: dict[str, object]) -> dict[str, str | list[str]]:
    headers: dict[str, str | list[str]] = {}
    for key, value in raw.items():
        if type(value) is bytes:
            headers[key] = value.decode("latin-1")
        elif type(value) is list and value and all(type(v) is bytes for v in value):
            headers[key] = [v.decode("latin-1") for v in value]
        else:
            raise RemoteProtocolError(f"Mongrel2 message: header {key[:40]!r} is not text")
    return headers


def _json_headers(raw: bytes) -> dict[str, str | list[str]]:
    try:
        value = _json.loads(raw.decode("latin-1"))
    except (ValueError, RecursionError):
        raise RemoteProtocolError("Mongrel2 message: headers are not valid JSON") from None
    if type(value) is not dict:
        raise RemoteProtocolError("Mongrel2 message: JSON headers are not an object")
    for key, item in value.items():
        if type(item) is str:
            continue
        if type(item) is list and item and all(type(v) is str for v in item):
            continue
        raise RemoteProtocolError(f"Mongrel2 message: header {key[:40]!r} is not text")
    return value


def encode_request(
    sender: str,
    conn_id: str,
    path: str,
    headers: Mapping[str, str | list[str]],
    body: bytes = b"",
    *,
    json: bool = False,
) -> bytes:
    """Encode a request message as Mongrel2 would (for tests and devices).

    Header values are text encoded latin-1 (lists stay lists; UnicodeEncodeError for text
    that is not latin-1); ``json=True`` writes the headers as a JSON netstring instead of a
    tnetstring dict.
    """
    if json:
        # compact, with the raw (latin-1) bytes inside the strings, as Mongrel2 writes it
        text = _json.dumps(headers, separators=(",", ":"), ensure_ascii=False)
        head = text.encode("latin-1")
        encoded = b"%d:%s," % (len(head), head)
    else:
        encoded = tnetstring.dumps(
            {
                key: value.encode("latin-1")
                if type(value) is str
                else [v.encode("latin-1") for v in value]
                for key, value in headers.items()
            }
        )
    return b"%s %s %s %s%d:%s," % (
        sender.encode("latin-1"),
        conn_id.encode("ascii"),
        path.encode("latin-1"),
        encoded,
        len(body),
        body,
    )


# --------------------------------------------------------------------------- replies


def encode_reply(sender: str, conn_ids: Iterable[str], payload: bytes) -> bytes:
    """``SENDER LEN:ID1 ID2..., PAYLOAD``; an empty payload closes those connections.

    ValueError if an id is not decimal digits or there is none.
    """
    ids = " ".join(conn_ids).encode("ascii")
    if not ids or not all(_IDENT.match(i) for i in ids.split(b" ")):
        raise ValueError(f"connection ids must be decimal digits: {ids[:40]!r}")
    return b"%s %d:%s, %s" % (sender.encode("latin-1"), len(ids), ids, payload)


def reply_prefix(sender: str, conn_id: str) -> bytes:
    """``encode_reply(sender, [conn_id], b"")`` for an id already known to be decimal
    digits (a parsed request's): the start of every reply to that connection."""
    return f"{sender} {len(conn_id)}:{conn_id}, ".encode("latin-1")


def parse_reply(msg: tnetstring.Buffer) -> tuple[str, list[str], bytes]:
    """The inverse of ``encode_reply`` (for tests and devices): sender, ids, payload."""
    msg = bytes(msg)
    sender, space, rest = msg.partition(b" ")
    if not space or not sender:
        raise RemoteProtocolError("Mongrel2 reply: expected SENDER LEN:IDS, PAYLOAD")
    try:
        ids, rest = tnetstring.pop(rest, max_length=65536, max_depth=0)
    except tnetstring.TNetstringError as exc:
        raise RemoteProtocolError(f"Mongrel2 reply: {exc}") from None
    if type(ids) is not bytes or rest[:1] != b" ":
        raise RemoteProtocolError("Mongrel2 reply: bad connection id list")
    id_list = ids.split(b" ")
    if not all(_IDENT.match(i) for i in id_list):
        raise RemoteProtocolError(f"Mongrel2 reply: bad connection ids {ids[:40]!r}")
    return sender.decode("latin-1"), [i.decode("ascii") for i in id_list], rest[1:]


# --------------------------------------------------------------------------- environ


def url_scheme(request: Request) -> str:
    """``https`` if Mongrel2 says the client connection is TLS, else ``http``."""
    scheme = request.headers.get("URL_SCHEME")
    return "https" if type(scheme) is str and scheme.lower() == "https" else "http"


def _unquote(text: str) -> str:
    if "%" not in text:
        return text
    return unquote_to_bytes(text.encode("latin-1")).decode("latin-1")


def _host_port(host: str) -> tuple[str, str]:
    """SERVER_NAME and SERVER_PORT from a Host header; the port "" when the header has
    none (the scheme's default port then)."""
    if host.startswith("["):  # [v6]:port
        close = host.find("]")
        if close > 0:
            port = host[close + 2 :] if host[close + 1 : close + 2] == ":" else ""
            return host[: close + 1], port if port.isdigit() else ""
        return host, ""
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        return name, port
    if colon and not port:
        return name, ""
    return host, ""


# Host header -> _host_port's answer, for the hosts seen so far; bounded, since a client
# chooses them (past the bound a host is split each time)
_HOSTS: dict[str, tuple[str, str]] = {}
_MAX_HOSTS = 256
_MAX_HOST = 256


# header key -> its environ name ("" for a key that is not one), for the keys seen so far;
# bounded, since a client chooses them (past the bound a name is worked out each time)
_ENV_NAMES: dict[str, str] = {}
_MAX_ENV_NAMES = 1024


def _env_name(key: str) -> str:
    if key in _SERVER_KEYS or not _HEADER_NAME.match(key) or key.startswith("x-mongrel2-upload-"):
        name = ""
    elif key == "content-type":
        name = "CONTENT_TYPE"
    elif key == "content-length":
        name = "CONTENT_LENGTH"
    else:
        name = "HTTP_" + key.upper().replace("-", "_")
    if len(_ENV_NAMES) < _MAX_ENV_NAMES and len(key) <= _MAX_KEY_ITEM:
        _ENV_NAMES[key] = name
    return name


def environ_from_request(request: Request) -> dict[str, str]:
    """The CGI part of the WSGI environ (no ``wsgi.*`` keys), by the module docstring's
    rule; ``url_scheme(request)`` gives ``wsgi.url_scheme``."""
    environ: dict[str, Any] = {}
    _fill_environ(request, environ)
    return environ


def wsgi_environ(request: Request, base: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` (the server's ``wsgi.*`` keys) with ``environ_from_request``'s
    keys and ``wsgi.url_scheme`` added: the request's environ but for wsgi.input/errors."""
    environ = dict(base)
    environ["wsgi.url_scheme"] = _fill_environ(request, environ)
    return environ


# route PATTERN -> its mount point (see the module docstring), for the patterns seen so far
# (Mongrel2's routes: a handful); bounded all the same
_MOUNTS: dict[str, str] = {}
_MAX_MOUNTS = 256
_MAX_MOUNT_PATTERN = 256


def _fill_environ(request: Request, environ: dict[str, Any]) -> str:
    """Add the CGI keys of ``request`` to ``environ``; return the URL scheme."""
    headers = request.headers
    get = headers.get
    path = get("PATH", request.path)
    if type(path) is not str:
        path = path[0]
    pattern = get("PATTERN", "")
    if type(pattern) is not str:
        pattern = pattern[0]
    mount = _MOUNTS.get(pattern)
    if mount is None:
        mount = pattern.split("(", 1)[0].rstrip("/")
        if len(_MOUNTS) < _MAX_MOUNTS and len(pattern) <= _MAX_MOUNT_PATTERN:
            _MOUNTS[pattern] = mount
    if mount and path.startswith(mount) and path[len(mount) : len(mount) + 1] in ("", "/"):
        script_name = mount
        path_info = path[len(mount) :]
        if "%" in script_name:
            script_name = _unquote(script_name)
    else:
        script_name = ""
        path_info = path
    if "%" in path_info:
        path_info = _unquote(path_info)
    scheme = get("URL_SCHEME")
    scheme = "http" if scheme is None or scheme == "http" else url_scheme(request)
    host = get("host", "")
    if type(host) is not str:
        host = host[0]
    if host:
        split = _HOSTS.get(host)
        if split is None:
            split = _host_port(host)
            if len(_HOSTS) < _MAX_HOSTS and len(host) <= _MAX_HOST:
                _HOSTS[host] = split
        server_name, server_port = split
    else:
        server_name, server_port = "localhost", ""
    if not server_port:
        server_port = "443" if scheme == "https" else "80"
    method = get("METHOD", "GET")
    query = get("QUERY", "")
    uri = get("URI", path)
    version = get("VERSION", "HTTP/1.1")
    remote = get("REMOTE_ADDR", "")
    environ["REQUEST_METHOD"] = method if type(method) is str else method[0]
    environ["SCRIPT_NAME"] = script_name
    environ["PATH_INFO"] = path_info
    environ["QUERY_STRING"] = query if type(query) is str else query[0]
    environ["REQUEST_URI"] = uri if type(uri) is str else uri[0]
    environ["SERVER_PROTOCOL"] = version if type(version) is str else version[0]
    environ["SERVER_NAME"] = server_name
    environ["SERVER_PORT"] = server_port
    environ["REMOTE_ADDR"] = remote if type(remote) is str else remote[0]
    names = _ENV_NAMES
    for key, value in headers.items():
        name = names.get(key)
        if name is None:
            name = _env_name(key)
        if name:
            if type(value) is not str:
                value = ("; " if key == "cookie" else ", ").join(value)
            environ[name] = value
    if request.body and "CONTENT_LENGTH" not in environ:
        environ["CONTENT_LENGTH"] = str(len(request.body))
    return scheme


# --------------------------------------------------------------------------- responses


def _version(request: Request) -> str:
    version = request.headers.get("VERSION")
    return "HTTP/1.0" if version == "HTTP/1.0" else "HTTP/1.1"


def _tokens(value: str | list[str] | None) -> set[str]:
    if value is None:
        return set()
    if type(value) is not str:
        value = ",".join(value)
    return {token.strip().lower() for token in value.split(",")}


def keep_alive(request: Request) -> bool:
    """Whether the client connection stays open after the response: HTTP/1.1 unless
    ``Connection: close``; HTTP/1.0 only with ``Connection: keep-alive``; else never."""
    version = request.headers.get("VERSION")
    connection = request.headers.get("connection")
    if connection is None:
        return version == "HTTP/1.1"
    tokens = _tokens(connection)
    if version == "HTTP/1.1":
        return "close" not in tokens
    if version == "HTTP/1.0":
        return "keep-alive" in tokens and "close" not in tokens
    return False


def response_head(
    request: Request,
    status: str,
    headers: list[tuple[str, str]],
    *,
    chunked: bool,
    close: bool,
) -> bytes:
    """The status line and headers for the client's HTTP version, then the blank line.

    Adds ``Transfer-Encoding: chunked`` when ``chunked`` (ValueError on HTTP/1.0, which has
    no chunked encoding), ``Connection: close`` when ``close``, and
    ``Connection: keep-alive`` on an HTTP/1.0 response that keeps the connection. The
    headers are taken as already checked (chaussette.wsgi does) and encoded latin-1.
    """
    version = _version(request)
    lines = [f"{version} {status}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    if chunked:
        if version == "HTTP/1.0":
            raise ValueError("chunked transfer-encoding on an HTTP/1.0 response")
        lines.append("Transfer-Encoding: chunked\r\n")
    if close:
        lines.append("Connection: close\r\n")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty ``data`` gives b"" (use LAST_CHUNK to end)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)
