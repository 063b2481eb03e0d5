"""The CGI response head, shared by the FastCGI and SCGI response side.

A CGI response starts with a ``Status:`` header instead of an HTTP status line; the web
server in front turns it into one. Header validation (no CR/LF, latin-1 only) is the WSGI
host's job; here the head is only encoded.
"""

from __future__ import annotations

__all__ = ["encode_head"]


def encode_head(status: str, headers: list[tuple[str, str]]) -> bytes:
    """Encode ``Status: <status>`` and the headers, ending with the empty line (latin-1)."""
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    return f"Status: {status}\r\n{''.join(lines)}\r\n".encode("latin-1")
