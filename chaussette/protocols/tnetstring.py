"""tnetstrings (typed netstrings, as Mongrel2 speaks them), sans-I/O.

Rules this module keeps (https://tnetstrings.info, and Mongrel2 1.12's own encoder):

- A value is ``<length>:<payload><tag>``: the length is the payload's size in bytes, written
  as ASCII decimal digits without a sign or leading zeros ("0" itself is allowed); the tag is
  one byte giving the type:

  ====  =========  ======================================================================
  tag   type       payload
  ====  =========  ======================================================================
  ,     string     raw bytes (decoded as ``bytes``; ``dumps`` writes ``str`` as UTF-8)
  #     integer    ``-?[0-9]+``
  ^     float      ``-?[0-9]+(.[0-9]*)?([eE][-+]?[0-9]+)?``, or ``nan``/``inf``/``-inf``
  !     boolean    ``true`` or ``false``
  ~     null       empty
  }     dict       key, value, key, value... each a whole tnetstring; keys are strings
  ]     list       values, each a whole tnetstring
  ====  =========  ======================================================================

- Decoding is strict: anything else -- a stray byte, a payload that is not exactly the
  values it declares, a non-string or non-UTF-8 dict key, a repeated dict key, an odd number
  of items in a dict -- is TNetstringError (a RemoteProtocolError), never a half-parsed value.
- Bounds: a declared length over ``max_length`` fails as soon as its digits are read (a
  length of 10**12 costs nothing: no buffer is sized from it), and so does nesting deeper
  than ``max_depth``. The parser keeps its own stack, so no depth reaches Python's recursion
  limit whatever ``max_depth`` is.
- ``pop`` reads one value off the front of a buffer and returns the rest. A buffer that is
  only the start of a value raises ``Incomplete`` (a TNetstringError): "read more", which a
  stream reader can tell from a real error. A proper prefix of a valid value is never taken
  for a value, because the outer length fixes where the value ends.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import RemoteProtocolError

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Incomplete",
    "TNetstringError",
    "dumps",
    "loads",
    "parse_at",
    "pop",
]

MAX_LENGTH = 64 * 1024 * 1024
MAX_DEPTH = 32


Buffer = bytes | bytearray | memoryview


class TNetstringError(RemoteProtocolError):
    """The bytes are not one valid tnetstring within the bounds."""


class Incomplete(TNetstringError):
    """The bytes are a valid start of a tnetstring but it is not complete yet."""


# --------------------------------------------------------------------------- encoding


def dumps(value: object, *, max_depth: int = MAX_DEPTH) -> bytes:
    """Encode ``value``.

    bytes (and bytearray, memoryview) and str (UTF-8) -> ``,``; bool -> ``!``; int -> ``#``;
    float -> ``^``; None -> ``~``; dict with str or bytes keys -> ``}``; list or tuple ->
    ``]``. TypeError for any other type; ValueError for nesting deeper than ``max_depth``
    (which also stops a container that contains itself).
    """
    parts: list[bytes] = []
    _dump(value, parts, max_depth)
    return b"".join(parts)


def _dump(value: Any, out: list[bytes], depth: int) -> None:
    # Each branch appends the header, then the payload parts, then the tag.
    kind = type(value)
    if kind is bytes or kind is str:
        data = value if kind is bytes else value.encode()
        out.append(b"%d:%s," % (len(data), data))
    elif kind is bool:
        out.append(b"4:true!" if value else b"5:false!")
    elif kind is int:
        data = b"%d" % value
        out.append(b"%d:%s#" % (len(data), data))
    elif value is None:
        out.append(b"0:~")
    elif kind is dict or kind is list or kind is tuple:
        if depth <= 0:
            raise ValueError("tnetstring nesting deeper than max_depth (or a cycle)")
        inner: list[bytes] = []
        if kind is dict:
            for key, item in value.items():
                if not isinstance(key, (str, bytes)):
                    raise TypeError(f"tnetstring dict keys must be str or bytes: {key!r}")
                _dump(key, inner, depth - 1)
                _dump(item, inner, depth - 1)
            tag = b"}"
        else:
            for item in value:
                _dump(item, inner, depth - 1)
            tag = b"]"
        payload = b"".join(inner)
        out.append(b"%d:" % len(payload))
        out.append(payload)
        out.append(tag)
    else:
        _dump_other(value, out, depth)


def _dump_other(value: Any, out: list[bytes], depth: int) -> None:
    """Subclasses and the less common types (the fast path checks exact types)."""
    if isinstance(value, bool):
        _dump(bool(value), out, depth)
    elif isinstance(value, int):
        _dump(int(value), out, depth)
    elif isinstance(value, float):
        data = repr(float(value)).encode()
        out.append(b"%d:%s^" % (len(data), data))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _dump(bytes(value), out, depth)
    elif isinstance(value, str):
        _dump(str(value), out, depth)
    elif isinstance(value, dict):
        _dump(dict(value), out, depth)
    elif isinstance(value, (list, tuple)):
        _dump(list(value), out, depth)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as a tnetstring")


# --------------------------------------------------------------------------- decoding

_INT = re.compile(rb"-?[0-9]+\Z")
_FLOAT = re.compile(rb"-?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|nan|inf)\Z")
_COMMA, _HASH, _CARET, _BANG, _TILDE, _BRACE, _BRACKET = b",#^!~}]"
_NO_KEY: Any = object()


def loads(data: Buffer, *, max_length: int = MAX_LENGTH, max_depth: int = MAX_DEPTH) -> object:
    """Decode exactly one value; trailing bytes are an error.

    Strings come back as ``bytes``, dict keys as ``str`` (UTF-8). TNetstringError (Incomplete
    if ``data`` is only the start of a value) on anything else.
    """
    data = bytes(data)
    value, end = _parse(data, 0, max_length, max_depth)
    if end != len(data):
        raise TNetstringError(f"{len(data) - end} bytes after the tnetstring")
    return value


def pop(
    data: Buffer, *, max_length: int = MAX_LENGTH, max_depth: int = MAX_DEPTH
) -> tuple[object, bytes]:
    """Decode the value at the start of ``data``; return it and the bytes after it.

    Incomplete if ``data`` is only the start of a value (read more and try again);
    TNetstringError if it is not the start of a valid one.
    """
    data = bytes(data)
    value, end = _parse(data, 0, max_length, max_depth)
    return value, data[end:]


def _fail(message: str, pos: int) -> TNetstringError:
    return TNetstringError(f"bad tnetstring at byte {pos}: {message}")


def parse_at(
    data: Buffer, pos: int = 0, *, max_length: int = MAX_LENGTH, max_depth: int = MAX_DEPTH
) -> tuple[object, int]:
    """Decode the value starting at offset ``pos`` of ``data`` (bytes); return it and the
    offset after it. ``pop`` without copying the rest: for parsers of larger messages."""
    if not 0 <= pos <= len(data):
        raise ValueError(f"offset {pos} outside the data")
    return _parse(bytes(data), pos, max_length, max_depth)


def _parse(data: bytes, pos: int, max_length: int, max_depth: int) -> tuple[object, int]:
    """The value at ``pos`` and the position after it.

    Iterative: the innermost open container is in locals (``container``, ``is_dict``, the
    pending dict ``key``, and ``end``, where its payload ends); opening another one saves
    them on ``stack``. Outside any container ``end`` is the end of the data.
    """
    size = len(data)
    max_digits = len(str(max_length))
    find = data.find
    end = size  # the value being read must end (tag included) before this
    stack: list[tuple[Any, bool, Any, int]] = []
    container: Any = None
    is_dict = False
    key: Any = _NO_KEY
    depth = 0
    while True:
        # ---- one header: digits, colon
        colon = find(b":", pos, min(end, pos + max_digits + 1))
        if colon < 0:
            window = data[pos : min(end, pos + max_digits + 1)]
            if window and not window.isdigit():
                raise _fail(f"length expected, got {window[:12]!r}", pos)
            if len(window) > max_digits:
                raise _fail(f"declared length over the bound of {max_length} bytes", pos)
            if window[:1] == b"0" and len(window) > 1:
                raise _fail("length with a leading zero", pos)
            if container is not None:
                raise _fail("value overruns its container", pos)
            raise Incomplete(f"incomplete tnetstring: {size - pos} bytes of its length")
        digits = data[pos:colon]
        if not digits.isdigit() or (digits[0] == 0x30 and colon - pos > 1):
            if digits.isdigit():
                raise _fail("length with a leading zero", pos)
            raise _fail(f"length expected, got {digits[:12]!r}", pos)
        length = int(digits)
        if length > max_length:
            raise _fail(f"declared length {length} over the bound of {max_length} bytes", pos)
        start = colon + 1
        stop = start + length  # the tag's position
        if stop >= end:
            if container is not None:
                raise _fail("value overruns its container", pos)
            raise Incomplete(f"incomplete tnetstring: {size - pos} of {stop + 1 - pos} bytes")
        tag = data[stop]
        # ---- the payload
        value: Any
        if tag == _COMMA:
            value = data[start:stop]
        elif tag in (_BRACE, _BRACKET):
            if depth >= max_depth:
                raise _fail(f"nesting deeper than {max_depth}", pos)
            if length:
                if container is not None:
                    stack.append((container, is_dict, key, end))
                is_dict = tag == _BRACE
                container = {} if is_dict else []
                key = _NO_KEY
                depth += 1
                pos = start
                end = stop
                continue
            value = {} if tag == _BRACE else []
        elif tag == _HASH:
            payload = data[start:stop]
            if not _INT.match(payload):
                raise _fail(f"bad integer {payload[:20]!r}", pos)
            try:
                value = int(payload)
            except ValueError:  # over sys.get_int_max_str_digits()
                raise _fail(f"integer of {length} digits", pos) from None
        elif tag == _CARET:
            payload = data[start:stop]
            if not _FLOAT.match(payload):
                raise _fail(f"bad float {payload[:20]!r}", pos)
            value = float(payload)
        elif tag == _BANG:
            payload = data[start:stop]
            if payload == b"true":
                value = True
            elif payload == b"false":
                value = False
            else:
                raise _fail(f"bad boolean {payload[:20]!r}", pos)
        elif tag == _TILDE:
            if length:
                raise _fail("null with a payload", pos)
            value = None
        else:
            raise _fail(f"unknown type tag {bytes([tag])!r}", stop)
        item_pos = pos
        pos = stop + 1
        # ---- deliver the value into the open containers, closing the complete ones
        while True:
            if container is None:
                return value, pos
            if not is_dict:
                container.append(value)
            elif key is _NO_KEY:
                if type(value) is not bytes:
                    raise _fail("dict key is not a string", item_pos)
                try:
                    key = value.decode()
                except UnicodeDecodeError:
                    raise _fail(f"dict key is not UTF-8: {value[:20]!r}", item_pos) from None
                if key in container:
                    raise _fail(f"repeated dict key {key[:40]!r}", item_pos)
            else:
                container[key] = value
                key = _NO_KEY
            if pos < end:
                break
            # pos == end: the container's payload is used up
            if key is not _NO_KEY:
                raise _fail("dict key without a value", pos)
            value = container
            pos = end + 1
            depth -= 1
            if stack:
                container, is_dict, key, end = stack.pop()
            else:
                container = None
                end = size
