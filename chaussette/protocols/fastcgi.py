"""FastCGI 1.0, application (server) side, sans-I/O.

Rules this module keeps (FastCGI Specification 1.0, Open Market, 1996):

- A record is an 8-byte header -- version (always 1), type, request id, content length
  (16 bits), padding length (8 bits), one reserved byte -- then the content, then the padding.
  So a record is at most 8 + 65535 + 255 bytes; RecordReader never holds more than one
  unfinished record.
- Request id 0 carries management records. GET_VALUES is answered with the names asked for
  among FCGI_MAX_CONNS, FCGI_MAX_REQS and FCGI_MPXS_CONNS; any other management type gets
  UNKNOWN_TYPE. The core writes those replies itself (``data_to_send``).
- BEGIN_REQUEST opens a request id. Only the RESPONDER role is served: other roles get
  END_REQUEST/UNKNOWN_ROLE, a second request on a non-multiplexing connection gets
  CANT_MPX_CONN, and more than ``max_reqs`` active requests on one connection get OVERLOADED.
  A rejected request never becomes an event; its later records are dropped.
- PARAMS records up to the empty one form one name-value block (1- or 4-byte lengths), bounded
  by ``max_params_size`` bytes, decoded latin-1, last repeated name wins. STDIN may only follow
  the end of the params; the empty STDIN record ends the body.
- Records for an id the server has ended are dropped silently (the web server may still be
  sending the body); records for an id never begun, a second BEGIN_REQUEST for an active id,
  a version other than 1, a malformed body or a record type an application never receives are
  RemoteProtocolError, after which the connection is dead.
- Stream output is cut into records of at most 65528 bytes (the largest multiple of 8 that
  fits), content padded to a multiple of 8. END_REQUEST follows the empty STDOUT record (and
  the empty STDERR record if STDERR was used). With KEEP_CONN clear, the connection is to be
  closed once that request has been ended (``should_close``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import RemoteProtocolError

__all__ = [
    "ABORT_REQUEST",
    "AUTHORIZER",
    "BEGIN_REQUEST",
    "CANT_MPX_CONN",
    "DATA",
    "END_REQUEST",
    "FCGI_VERSION_1",
    "FILTER",
    "GET_VALUES",
    "GET_VALUES_RESULT",
    "KEEP_CONN",
    "OVERLOADED",
    "PARAMS",
    "REQUEST_COMPLETE",
    "RESPONDER",
    "STDERR",
    "STDIN",
    "STDOUT",
    "UNKNOWN_ROLE",
    "UNKNOWN_TYPE",
    "Aborted",
    "Event",
    "Params",
    "Record",
    "RecordReader",
    "RequestStarted",
    "ServerConnection",
    "StdinData",
    "StdinEnd",
    "decode_pairs",
    "encode_begin_request",
    "encode_end_request",
    "encode_pairs",
    "encode_record",
    "encode_stream",
]

FCGI_VERSION_1 = 1
HEADER_LEN = 8
MAX_CONTENT_LEN = 0xFFFF
MAX_PADDING_LEN = 0xFF
MAX_RECORD_LEN = HEADER_LEN + MAX_CONTENT_LEN + MAX_PADDING_LEN
# Stream chunk: the largest multiple of 8 a record can carry, so full records need no padding.
STREAM_CHUNK = MAX_CONTENT_LEN & ~7

NULL_REQUEST_ID = 0

# record types
BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11
MAXTYPE = UNKNOWN_TYPE

TYPE_NAMES = {
    BEGIN_REQUEST: "BEGIN_REQUEST",
    ABORT_REQUEST: "ABORT_REQUEST",
    END_REQUEST: "END_REQUEST",
    PARAMS: "PARAMS",
    STDIN: "STDIN",
    STDOUT: "STDOUT",
    STDERR: "STDERR",
    DATA: "DATA",
    GET_VALUES: "GET_VALUES",
    GET_VALUES_RESULT: "GET_VALUES_RESULT",
    UNKNOWN_TYPE: "UNKNOWN_TYPE",
}

# roles
RESPONDER = 1
AUTHORIZER = 2
FILTER = 3

# BEGIN_REQUEST flags
KEEP_CONN = 1

# END_REQUEST protocol statuses
REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3

# GET_VALUES names
FCGI_MAX_CONNS = b"FCGI_MAX_CONNS"
FCGI_MAX_REQS = b"FCGI_MAX_REQS"
FCGI_MPXS_CONNS = b"FCGI_MPXS_CONNS"

_HEADER = struct.Struct("!BBHHBx")
_BEGIN_BODY = struct.Struct("!HB5x")
_END_BODY = struct.Struct("!IB3x")
_UNKNOWN_BODY = struct.Struct("!B7x")
_U32 = struct.Struct("!I")
_PADDING = [b"\0" * n for n in range(MAX_PADDING_LEN + 1)]
_LONG_LEN_FLAG = 0x80000000
_MAX_PAIR_LEN = 0x7FFFFFFF


def _type_name(record_type: int) -> str:
    return TYPE_NAMES.get(record_type, f"type {record_type}")


# --------------------------------------------------------------------------- codec


def encode_record(
    type: int,
    request_id: int,
    content: bytes = b"",
    padding: int | None = None,
) -> bytes:
    """Encode one record. ``padding=None`` pads the content to a multiple of 8.

    ValueError if the content is over 65535 bytes, the padding over 255, or the type or the
    request id out of range.
    """
    size = len(content)
    if size > MAX_CONTENT_LEN:
        raise ValueError(f"record content of {size} bytes: at most {MAX_CONTENT_LEN} fit")
    if padding is None:
        padding = -size & 7
    elif not 0 <= padding <= MAX_PADDING_LEN:
        raise ValueError(f"record padding of {padding} bytes: 0 to {MAX_PADDING_LEN}")
    if not 0 <= type <= 0xFF:
        raise ValueError(f"record type {type}: 0 to 255")
    if not 0 <= request_id <= 0xFFFF:
        raise ValueError(f"request id {request_id}: 0 to 65535")
    return b"".join(
        (_HEADER.pack(FCGI_VERSION_1, type, request_id, size, padding), content, _PADDING[padding])
    )


def encode_stream(type: int, request_id: int, data: bytes) -> bytes:
    """Encode ``data`` as stream records of at most 65528 bytes, each padded to 8.

    ``data == b""`` gives the one empty record that ends the stream.
    """
    size = len(data)
    if size <= STREAM_CHUNK:
        return encode_record(type, request_id, data)
    if not 0 <= request_id <= 0xFFFF or not 0 <= type <= 0xFF:
        raise ValueError(f"record type {type} / request id {request_id} out of range")
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    pack = _HEADER.pack
    for start in range(0, size, STREAM_CHUNK):
        chunk = view[start : start + STREAM_CHUNK]
        padding = -len(chunk) & 7
        parts.append(pack(FCGI_VERSION_1, type, request_id, len(chunk), padding))
        parts.append(chunk)
        if padding:
            parts.append(_PADDING[padding])
    return b"".join(parts)


def _encode_length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    if size > _MAX_PAIR_LEN:
        raise ValueError(f"name or value of {size} bytes: at most {_MAX_PAIR_LEN}")
    return _U32.pack(size | _LONG_LEN_FLAG)


def encode_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode name-value pairs: lengths under 128 in 1 byte, others in 4 (high bit set)."""
    parts: list[bytes] = []
    for name, value in pairs:
        parts.append(_encode_length(len(name)))
        parts.append(_encode_length(len(value)))
        parts.append(name)
        parts.append(value)
    return b"".join(parts)


def _pair_spans(data: bytes) -> list[tuple[int, int, int]]:
    """(name start, value start, value end) of each pair; RemoteProtocolError on bad data.

    Running off the end surfaces as IndexError/struct.error and becomes the error.
    """
    spans = []
    pos = 0
    end = len(data)
    unpack = _U32.unpack_from
    try:
        while pos < end:
            name_len = data[pos]
            if name_len < 0x80:
                pos += 1
            else:
                name_len = unpack(data, pos)[0] & _MAX_PAIR_LEN
                pos += 4
            value_len = data[pos]
            if value_len < 0x80:
                pos += 1
            else:
                value_len = unpack(data, pos)[0] & _MAX_PAIR_LEN
                pos += 4
            value_start = pos + name_len
            value_end = value_start + value_len
            if value_end > end:
                raise RemoteProtocolError(
                    f"name-value pair of {name_len}+{value_len} bytes at byte {pos}: "
                    f"only {end - pos} bytes left"
                )
            spans.append((pos, value_start, value_end))
            pos = value_end
    except (IndexError, struct.error):
        raise RemoteProtocolError(
            f"name-value pair: length cut short at byte {pos} of {end}"
        ) from None
    return spans


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    """Decode a name-value block into (name, value) pairs, in order, repeats kept.

    RemoteProtocolError if a length runs past the end of the block.
    """
    data = bytes(data)
    return [(data[a:b], data[b:c]) for a, b, c in _pair_spans(data)]


def _decode_params(data: bytes) -> dict[str, str]:
    """The params block as a dict, latin-1, last repeat wins (the per-request hot path)."""
    # latin-1 maps byte i to char i, so byte offsets are char offsets: decode once, slice str.
    text = data.decode("latin-1")
    params: dict[str, str] = {}
    pos = 0
    end = len(data)
    unpack = _U32.unpack_from
    try:
        while pos < end:
            name_len = data[pos]
            if name_len < 0x80:
                value_len = data[pos + 1]
                if value_len < 0x80:
                    pos += 2
                else:
                    value_len = unpack(data, pos + 1)[0] & _MAX_PAIR_LEN
                    pos += 5
            else:
                name_len = unpack(data, pos)[0] & _MAX_PAIR_LEN
                value_len = data[pos + 4]
                if value_len < 0x80:
                    pos += 5
                else:
                    value_len = unpack(data, pos + 4)[0] & _MAX_PAIR_LEN
                    pos += 8
            value_start = pos + name_len
            value_end = value_start + value_len
            if value_end > end:
                break
            params[text[pos:value_start]] = text[value_start:value_end]
            pos = value_end
        else:
            return params
    except (IndexError, struct.error):
        pass
    _pair_spans(data)  # raises, with the message saying where and how
    raise AssertionError("unreachable: _pair_spans accepted what _decode_params refused")


def encode_begin_request(request_id: int, role: int = RESPONDER, keep_conn: bool = True) -> bytes:
    """A BEGIN_REQUEST record (what a web server sends first for each request)."""
    return encode_record(
        BEGIN_REQUEST, request_id, _BEGIN_BODY.pack(role, KEEP_CONN if keep_conn else 0)
    )


def encode_end_request(
    request_id: int, app_status: int = 0, protocol_status: int = REQUEST_COMPLETE
) -> bytes:
    """An END_REQUEST record. ``app_status`` is taken modulo 2**32 (a CGI exit status)."""
    return encode_record(
        END_REQUEST, request_id, _END_BODY.pack(app_status & 0xFFFFFFFF, protocol_status)
    )


_end_cache: dict[tuple[int, int, int, bool], bytes] = {}
_END_CACHE_SIZE = 1024


def _end_records(request_id: int, app_status: int, protocol_status: int, stderr: bool) -> bytes:
    """The end of a response: empty STDOUT (and STDERR), END_REQUEST. The same few bytes
    for most requests (web servers reuse small request ids): cached."""
    key = (request_id, app_status, protocol_status, stderr)
    tail = _end_cache.get(key)
    if tail is None:
        parts = [encode_record(STDOUT, request_id)]
        if stderr:
            parts.append(encode_record(STDERR, request_id))
        parts.append(encode_end_request(request_id, app_status, protocol_status))
        tail = b"".join(parts)
        if len(_end_cache) < _END_CACHE_SIZE:
            _end_cache[key] = tail
    return tail


@dataclass(slots=True)
class Record:
    """One decoded record: its type, request id and content (padding dropped)."""

    type: int
    request_id: int
    content: bytes


class RecordReader:
    """Incremental record parser: feed bytes, get the records they complete.

    Whole records are sliced straight out of the fed bytes; only the unfinished tail is kept,
    so the buffer never holds more than one record (at most 8 + 65535 + 255 bytes).
    A version other than 1 raises RemoteProtocolError as soon as the header is seen.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished record."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Record]:
        return [Record(*fields) for fields in self.feed_fields(data)]

    def feed_fields(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """``feed``, with each record as a (type, request id, content) tuple (cheaper)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        records: list[tuple[int, int, bytes]] = []
        pos = 0
        buf = self._buf
        if buf:
            pos = self._top_up(data, records)
            if buf:
                return records
        end = len(data)
        unpack = _HEADER.unpack_from
        append = records.append
        while end - pos >= HEADER_LEN:
            version, rtype, request_id, size, padding = unpack(data, pos)
            if version != FCGI_VERSION_1:
                raise RemoteProtocolError(f"record version {version} at byte {pos}, expected 1")
            start = pos + HEADER_LEN
            stop = start + size
            if stop + padding > end:
                break
            append((rtype, request_id, data[start:stop]))
            pos = stop + padding
        if pos < end:
            # fail on a bad version byte now rather than after buffering a "record" of garbage
            if data[pos] != FCGI_VERSION_1:
                raise RemoteProtocolError(f"record version {data[pos]}, expected 1")
            buf += data[pos:]
        return records

    def _top_up(self, data: bytes, records: list[tuple[int, int, bytes]]) -> int:
        """Complete the buffered record from ``data``; return how many bytes were used."""
        buf = self._buf
        used = 0
        if len(buf) < HEADER_LEN:
            used = HEADER_LEN - len(buf)
            buf += data[:used]
            if len(buf) < HEADER_LEN:
                return used
        version: int
        rtype: int
        request_id: int
        size: int
        padding: int
        version, rtype, request_id, size, padding = _HEADER.unpack_from(buf)
        if version != FCGI_VERSION_1:
            raise RemoteProtocolError(f"record version {version}, expected 1")
        missing = HEADER_LEN + size + padding - len(buf)
        buf += data[used : used + missing]
        used += missing
        if len(buf) == HEADER_LEN + size + padding:
            records.append((rtype, request_id, bytes(buf[HEADER_LEN : HEADER_LEN + size])))
            buf.clear()
        return used


# --------------------------------------------------------------------------- events


@dataclass(slots=True)
class RequestStarted:
    """BEGIN_REQUEST accepted for a RESPONDER request."""

    request_id: int
    role: int
    keep_conn: bool


@dataclass(slots=True)
class Params:
    """The complete params of a request (the CGI environment), latin-1."""

    request_id: int
    params: dict[str, str]


@dataclass(slots=True)
class StdinData:
    """A piece of the request body; never empty."""

    request_id: int
    data: bytes


@dataclass(slots=True)
class StdinEnd:
    """The empty STDIN record: the body is complete."""

    request_id: int


@dataclass(slots=True)
class Aborted:
    """ABORT_REQUEST from the web server; the driver still ends the request."""

    request_id: int


Event = RequestStarted | Params | StdinData | StdinEnd | Aborted


class _Request:
    __slots__ = (
        "aborted",
        "keep_conn",
        "params",
        "params_done",
        "params_size",
        "stderr_used",
        "stdin_done",
    )

    def __init__(self, keep_conn: bool) -> None:
        self.keep_conn = keep_conn
        self.params: list[bytes] = []
        self.params_size = 0
        self.params_done = False
        self.stdin_done = False
        self.aborted = False
        self.stderr_used = False


# --------------------------------------------------------------------------- connection


class ServerConnection:
    """The application side of one FastCGI connection.

    Feed what the socket reads to ``receive_data``; handle the events; write what
    ``data_to_send``, ``send_stdout``, ``send_stderr`` and ``end_request`` return
    (``data_to_send`` after each ``receive_data``: refusals and management replies wait there).

    Not locked: ``send_stdout``/``send_stderr`` only encode (and flag STDERR as used), and
    ``end_request`` may race with ``receive_data`` under the GIL (late records for the ended id
    are then dropped, or delivered once more as events for a request the driver has finished:
    drop those). ``data_to_send`` belongs to the thread that calls ``receive_data``.
    """

    def __init__(
        self,
        *,
        max_conns: int,
        max_reqs: int,
        mpxs_conns: bool = True,
        max_params_size: int = 65536,
    ) -> None:
        self.max_conns = max_conns
        self.max_reqs = max_reqs
        self.mpxs_conns = mpxs_conns
        self.max_params_size = max_params_size
        self._reader = RecordReader()
        self._requests: dict[int, _Request] = {}
        # Ids ended or rejected by us: their late records are dropped. At most 65535 ids.
        self._finished: set[int] = set()
        self._out = bytearray()
        self._should_close = False
        self._failed: str | None = None
        self._eof = False
        self._values = {
            FCGI_MAX_CONNS: str(max_conns).encode("ascii"),
            FCGI_MAX_REQS: str(max_reqs).encode("ascii"),
            FCGI_MPXS_CONNS: b"1" if mpxs_conns else b"0",
        }

    # ---- input

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side.

        Returns the events they complete. RemoteProtocolError if the peer broke the protocol;
        the connection is dead after that (every later call raises it again).
        """
        if self._failed is not None:
            raise RemoteProtocolError(self._failed)
        try:
            if not data:
                self._eof = True
                if self._reader.pending:
                    raise RemoteProtocolError(
                        f"peer closed the connection in the middle of a record "
                        f"({self._reader.pending} bytes of it received)"
                    )
                return []
            if self._eof:
                raise RemoteProtocolError("data received after the peer closed the connection")
            events: list[Event] = []
            for rtype, request_id, content in self._reader.feed_fields(data):
                self._handle(rtype, request_id, content, events)
            return events
        except RemoteProtocolError as exc:
            self._failed = str(exc)
            raise

    def _handle(self, rtype: int, request_id: int, content: bytes, events: list[Event]) -> None:
        if request_id == NULL_REQUEST_ID:
            self._management(rtype, content)
            return
        request = self._requests.get(request_id)
        if rtype == STDIN:
            if request is None:
                self._orphan(rtype, request_id)
            elif request.aborted:
                pass
            elif not request.params_done:
                raise RemoteProtocolError(f"STDIN for request {request_id} before its PARAMS ended")
            elif request.stdin_done:
                raise RemoteProtocolError(f"STDIN for request {request_id} after its end")
            elif content:
                events.append(StdinData(request_id, content))
            else:
                request.stdin_done = True
                events.append(StdinEnd(request_id))
        elif rtype == PARAMS:
            if request is None:
                self._orphan(rtype, request_id)
            elif not request.aborted:
                self._params(request_id, request, content, events)
        elif rtype == BEGIN_REQUEST:
            self._begin(request_id, content, request, events)
        elif rtype == ABORT_REQUEST:
            if request is None:
                self._orphan(rtype, request_id)
            elif not request.aborted:
                request.aborted = True
                events.append(Aborted(request_id))
        elif rtype == DATA:
            # FILTER role only, which is refused at BEGIN_REQUEST: nothing to do with it.
            if request is None:
                self._orphan(rtype, request_id)
        else:
            raise RemoteProtocolError(
                f"{_type_name(rtype)} record for request {request_id}: "
                "not a record an application receives"
            )

    def _params(
        self, request_id: int, request: _Request, content: bytes, events: list[Event]
    ) -> None:
        if request.params_done:
            raise RemoteProtocolError(f"PARAMS for request {request_id} after the empty PARAMS")
        if content:
            request.params_size += len(content)
            if request.params_size > self.max_params_size:
                raise RemoteProtocolError(
                    f"params of request {request_id} over {self.max_params_size} bytes "
                    "(--max-params-size)"
                )
            request.params.append(content)
            return
        request.params_done = True
        block = b"".join(request.params)
        request.params = []
        request.params_size = 0
        events.append(Params(request_id, _decode_params(block)))

    def _begin(
        self, request_id: int, content: bytes, request: _Request | None, events: list[Event]
    ) -> None:
        if len(content) != _BEGIN_BODY.size:
            raise RemoteProtocolError(
                f"BEGIN_REQUEST for request {request_id} with {len(content)} bytes "
                "of content, expected 8"
            )
        if request is not None:
            raise RemoteProtocolError(f"BEGIN_REQUEST for request {request_id}, already active")
        role, flags = _BEGIN_BODY.unpack(content)
        keep_conn = bool(flags & KEEP_CONN)
        self._finished.discard(request_id)
        if role != RESPONDER:
            status = UNKNOWN_ROLE
        elif self._requests and not self.mpxs_conns:
            status = CANT_MPX_CONN
        elif len(self._requests) >= self.max_reqs:
            status = OVERLOADED
        else:
            self._requests[request_id] = _Request(keep_conn)
            events.append(RequestStarted(request_id, role, keep_conn))
            return
        self._finished.add(request_id)
        self._out += encode_end_request(request_id, 0, status)
        if not keep_conn:
            self._should_close = True

    def _orphan(self, rtype: int, request_id: int) -> None:
        if request_id in self._finished:
            return  # the peer may still be sending what we no longer need
        raise RemoteProtocolError(
            f"{_type_name(rtype)} record for request {request_id}, which was never begun"
        )

    def _management(self, rtype: int, content: bytes) -> None:
        if rtype == GET_VALUES:
            asked = dict.fromkeys(name for name, _ in decode_pairs(content))
            answer = [(name, self._values[name]) for name in asked if name in self._values]
            self._out += encode_record(GET_VALUES_RESULT, NULL_REQUEST_ID, encode_pairs(answer))
        else:
            self._out += encode_record(UNKNOWN_TYPE, NULL_REQUEST_ID, _UNKNOWN_BODY.pack(rtype))

    # ---- output

    def data_to_send(self) -> bytes:
        """Bytes the core produced itself (management replies, refusals); empties them."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_stdout(self, request_id: int, data: bytes) -> bytes:
        """STDOUT records carrying ``data``; ``b""`` gives ``b""`` (the stream stays open)."""
        if not data:
            return b""
        return encode_stream(STDOUT, request_id, data)

    def send_stderr(self, request_id: int, data: bytes) -> bytes:
        """STDERR records carrying ``data``; ``b""`` gives ``b""`` (the stream stays open)."""
        if not data:
            return b""
        request = self._requests.get(request_id)
        if request is not None:
            request.stderr_used = True
        return encode_stream(STDERR, request_id, data)

    def end_request(
        self, request_id: int, app_status: int = 0, protocol_status: int = REQUEST_COMPLETE
    ) -> bytes:
        """End an active request: empty STDOUT (and STDERR if used), then END_REQUEST.

        ValueError if ``request_id`` is not active (never begun, or already ended).
        """
        request = self._requests.get(request_id)
        if request is None:
            raise ValueError(f"request {request_id} is not active")
        # finished first, then no longer active: a receive_data running in another thread
        # sees the id in one of the two, never in neither (which would read as "never begun")
        self._finished.add(request_id)
        del self._requests[request_id]
        if not request.keep_conn:
            self._should_close = True
        return _end_records(request_id, app_status, protocol_status, request.stderr_used)

    # ---- state

    @property
    def active(self) -> set[int]:
        """Request ids begun and not yet ended (a fresh set)."""
        return set(self._requests)

    @property
    def should_close(self) -> bool:
        """True once a request without KEEP_CONN has been ended or refused."""
        return self._should_close
