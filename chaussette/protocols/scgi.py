"""SCGI, server side, sans-I/O (one request per connection).

Rules this module keeps (the SCGI protocol by Neil Schemenauer, 2006):

- The request starts with a netstring ``<length>:<header block>,``. The length is ASCII
  digits; the block is bounded by ``max_params_size`` bytes, so a peer cannot make us buffer
  more than that (and a non-digit before the colon fails at once).
- The block is NUL-terminated strings, name then value, repeated. The first name must be
  CONTENT_LENGTH, its value a non-negative decimal integer; SCGI must be present and "1".
  Names and values are decoded latin-1; a repeated name keeps its last value.
- Exactly CONTENT_LENGTH bytes of body follow; a byte beyond it is an error, and so is the
  peer closing before the body is complete. Closing before sending anything is not an error.
- The response (a CGI head, see ``cgi.encode_head``, then the body) ends when the server
  closes the connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RemoteProtocolError

__all__ = [
    "BodyData",
    "BodyEnd",
    "Event",
    "Request",
    "ServerConnection",
    "encode_netstring",
    "encode_request",
]

_MAX_CONTENT_LENGTH_DIGITS = 18  # 10**18 bytes: far beyond any body, and an int() in bounds
_DIGITS = b"0123456789"


def encode_netstring(data: bytes) -> bytes:
    """``b"<len>:<data>,"``."""
    return b"%d:%s," % (len(data), data)


def encode_request(headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """Encode a whole SCGI request (for test clients).

    CONTENT_LENGTH (first) and SCGI=1 are added when ``headers`` lacks them; given ones are
    kept as they are, where they are, so a test can also build a bad request.
    """
    names = {name for name, _ in headers}
    full = list(headers)
    if b"SCGI" not in names:
        full.insert(0, (b"SCGI", b"1"))
    if b"CONTENT_LENGTH" not in names:
        full.insert(0, (b"CONTENT_LENGTH", b"%d" % len(body)))
    block = b"".join(b"%s\0%s\0" % (name, value) for name, value in full)
    return encode_netstring(block) + body


@dataclass(slots=True)
class Request:
    """The header block, complete and valid (latin-1)."""

    params: dict[str, str]


@dataclass(slots=True)
class BodyData:
    """A piece of the body; never empty."""

    data: bytes


@dataclass(slots=True)
class BodyEnd:
    """The body is complete (CONTENT_LENGTH bytes received)."""


Event = Request | BodyData | BodyEnd

_HEAD, _BODY, _DONE = range(3)


class ServerConnection:
    """The server side of one SCGI connection: feed bytes, get Request, BodyData, BodyEnd."""

    def __init__(self, *, max_params_size: int = 65536) -> None:
        self.max_params_size = max_params_size
        # the netstring length can have at most this many digits
        self._max_digits = len(str(max_params_size))
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._received = 0
        self._failed: str | None = None

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side.

        RemoteProtocolError if the peer broke the protocol; every later call raises it again.
        """
        if self._failed is not None:
            raise RemoteProtocolError(self._failed)
        try:
            return self._receive(bytes(data))
        except RemoteProtocolError as exc:
            self._failed = str(exc)
            raise

    @property
    def body_remaining(self) -> int:
        """Body bytes still expected (0 before the head is complete and after the body)."""
        return self._remaining

    def _receive(self, data: bytes) -> list[Event]:
        if not data:
            return self._closed()
        self._received += len(data)
        events: list[Event] = []
        if self._state == _HEAD:
            data = self._head(data, events)
            if self._state == _HEAD:
                return events
        if self._state == _DONE:
            if data:
                raise RemoteProtocolError(f"{len(data)} bytes beyond CONTENT_LENGTH")
            return events
        if data:
            size = len(data)
            if size > self._remaining:
                raise RemoteProtocolError(f"{size - self._remaining} bytes beyond CONTENT_LENGTH")
            self._remaining -= size
            events.append(BodyData(data))
            if not self._remaining:
                self._state = _DONE
                events.append(BodyEnd())
        return events

    def _closed(self) -> list[Event]:
        if self._state == _DONE or self._received == 0:
            self._state = _DONE
            return []
        if self._state == _HEAD:
            raise RemoteProtocolError(
                f"peer closed the connection inside the header block ({len(self._buf)} bytes)"
            )
        raise RemoteProtocolError(
            f"peer closed the connection with {self._remaining} body bytes still to come"
        )

    def _head(self, data: bytes, events: list[Event]) -> bytes:
        """Buffer the netstring; once complete, emit Request and return the bytes after it."""
        buf = self._buf
        buf += data
        colon = buf.find(b":", 0, self._max_digits + 1)
        if colon < 0:
            digits = bytes(buf[: self._max_digits + 1])
            if digits.strip(_DIGITS) or len(digits) > self._max_digits:
                raise RemoteProtocolError(
                    f"request does not start with a netstring length: {digits[:20]!r}"
                )
            return b""
        digits = bytes(buf[:colon])
        if not digits or digits.strip(_DIGITS):
            raise RemoteProtocolError(f"bad netstring length {digits[:20]!r}")
        size = int(digits)
        if size > self.max_params_size:
            raise RemoteProtocolError(
                f"header block of {size} bytes, over {self.max_params_size} (--max-params-size)"
            )
        start = colon + 1
        end = start + size
        if len(buf) <= end:
            return b""
        if buf[end] != 0x2C:  # ","
            raise RemoteProtocolError("header netstring not terminated by ','")
        params, content_length = _parse_block(bytes(buf[start:end]))
        rest = bytes(buf[end + 1 :])
        buf.clear()
        self._remaining = content_length
        self._state = _BODY if content_length else _DONE
        events.append(Request(params))
        if not content_length:
            events.append(BodyEnd())
        return rest


def _parse_block(block: bytes) -> tuple[dict[str, str], int]:
    if not block.endswith(b"\0"):
        raise RemoteProtocolError("header block does not end with NUL")
    strings = block[:-1].decode("latin-1").split("\0")
    if len(strings) % 2:
        raise RemoteProtocolError(f"header block has a name without a value ({strings[-1]!r})")
    if strings[0] != "CONTENT_LENGTH":
        raise RemoteProtocolError(f"first header is {strings[0][:40]!r}, not CONTENT_LENGTH")
    length = strings[1]
    if (
        not length
        or len(length) > _MAX_CONTENT_LENGTH_DIGITS
        or not length.isascii()
        or not length.isdigit()
    ):
        raise RemoteProtocolError(f"bad CONTENT_LENGTH {length[:40]!r}")
    params = dict(zip(strings[0::2], strings[1::2], strict=True))
    if params["CONTENT_LENGTH"] != length:
        raise RemoteProtocolError("CONTENT_LENGTH repeated with another value")
    if params.get("SCGI") != "1":
        raise RemoteProtocolError(f"SCGI header is {params.get('SCGI')!r}, expected '1'")
    return params, int(length)
