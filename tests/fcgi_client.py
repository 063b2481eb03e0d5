"""A small FastCGI (and SCGI) test client over a real socket, built on the core's codec.

It can interleave requests on one connection (``begin`` several, then ``send_body`` /
``result`` in any order), send management records and raw bytes, and reads records as
they come, keeping each request's STDOUT/STDERR apart.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from chaussette.protocols import fastcgi as fcgi
from chaussette.protocols import scgi

DEFAULT_PARAMS = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "SERVER_NAME": "localhost",
    "SERVER_PORT": "80",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "127.0.0.1",
}


def params_for(path: str, method: str = "GET", body: bytes = b"", **extra: str) -> dict[str, str]:
    """CGI params for ``path`` (query string split off), as nginx would send them."""
    path_info, _, query = path.partition("?")
    params = dict(DEFAULT_PARAMS)
    params.update(REQUEST_METHOD=method, PATH_INFO=path_info, QUERY_STRING=query)
    params["REQUEST_URI"] = path
    if method in ("POST", "PUT") or body:
        params["CONTENT_LENGTH"] = str(len(body))
        params["CONTENT_TYPE"] = "application/octet-stream"
    params.update(extra)
    return params


@dataclass
class Result:
    """What came back for one request."""

    stdout: bytes = b""
    stderr: bytes = b""
    app_status: int | None = None
    protocol_status: int | None = None
    pieces: list[bytes] = field(default_factory=list)  # STDOUT contents as they came

    @property
    def ended(self) -> bool:
        return self.protocol_status is not None

    def cgi(self) -> tuple[int, dict[str, str], bytes]:
        """(status code, headers with lower-case names, body) of the CGI response."""
        return parse_cgi(self.stdout)


def parse_cgi(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no end of CGI headers in {data[:300]!r}")
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(headers["status"][:3]), headers, body


class FCGIClient:
    def __init__(self, address: tuple[str, int] | str, timeout: float = 10) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        except BaseException:
            self.sock.close()
            raise
        self.reader = fcgi.RecordReader()
        self.results: dict[int, Result] = {}
        self.management: list[fcgi.Record] = []
        self.closed = False

    def __enter__(self) -> FCGIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- sending --

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def begin(
        self,
        request_id: int,
        params: dict[str, str],
        body: bytes | None = b"",
        keep_conn: bool = True,
    ) -> None:
        """BEGIN_REQUEST and PARAMS; then the body and the end of STDIN, unless ``body`` is
        None (send it later with ``send_body``)."""
        self.send(self.begin_bytes(request_id, params, body, keep_conn))

    def begin_bytes(
        self,
        request_id: int,
        params: dict[str, str],
        body: bytes | None = b"",
        keep_conn: bool = True,
    ) -> bytes:
        """What ``begin`` sends, to send later (e.g. with another request, in one write)."""
        self.results[request_id] = Result()
        pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in params.items()]
        data = fcgi.encode_begin_request(request_id, keep_conn=keep_conn)
        data += fcgi.encode_stream(fcgi.PARAMS, request_id, fcgi.encode_pairs(pairs))
        data += fcgi.encode_stream(fcgi.PARAMS, request_id, b"")
        if body is not None:
            data += fcgi.encode_stream(fcgi.STDIN, request_id, body) if body else b""
            data += fcgi.encode_stream(fcgi.STDIN, request_id, b"")
        return data

    def send_body(self, request_id: int, body: bytes, end: bool = True) -> None:
        data = fcgi.encode_stream(fcgi.STDIN, request_id, body) if body else b""
        if end:
            data += fcgi.encode_stream(fcgi.STDIN, request_id, b"")
        self.send(data)

    def abort(self, request_id: int) -> None:
        self.send(fcgi.encode_record(fcgi.ABORT_REQUEST, request_id))

    def get_values(self, *names: bytes) -> dict[bytes, bytes]:
        self.send(
            fcgi.encode_record(fcgi.GET_VALUES, 0, fcgi.encode_pairs((n, b"") for n in names))
        )
        record = self.management_record()
        assert record.type == fcgi.GET_VALUES_RESULT, record
        return dict(fcgi.decode_pairs(record.content))

    # -- receiving --

    def read_some(self) -> bool:
        """Read once and dispatch the records; False when the server closed."""
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        for record in self.reader.feed(data):
            self._dispatch(record)
        return True

    def _dispatch(self, record: fcgi.Record) -> None:
        if record.request_id == 0:
            self.management.append(record)
            return
        result = self.results.setdefault(record.request_id, Result())
        if record.type == fcgi.STDOUT:
            result.stdout += record.content
            if record.content:
                result.pieces.append(record.content)
        elif record.type == fcgi.STDERR:
            result.stderr += record.content
        elif record.type == fcgi.END_REQUEST:
            app, proto = int.from_bytes(record.content[:4], "big"), record.content[4]
            result.app_status, result.protocol_status = app, proto

    def result(self, request_id: int) -> Result:
        """Read until that request has ended."""
        result = self.results.setdefault(request_id, Result())
        for _ in range(100_000):
            if result.ended:
                return result
            if not self.read_some():
                raise AssertionError(f"closed before END_REQUEST of {request_id}: {result}")
        raise AssertionError("too many reads")

    def first_ended(self, *request_ids: int) -> int:
        """Read until one of these requests has ended; its id."""
        for _ in range(100_000):
            for request_id in request_ids:
                if self.results[request_id].ended:
                    return request_id
            if not self.read_some():
                raise AssertionError("closed before any END_REQUEST")
        raise AssertionError("too many reads")

    def management_record(self) -> fcgi.Record:
        for _ in range(1000):
            if self.management:
                return self.management.pop(0)
            if not self.read_some():
                raise AssertionError("closed before a management record")
        raise AssertionError("too many reads")

    def closed_by_server(self) -> bool:
        """True when the server closes (bounded by the socket timeout)."""
        return any(not self.read_some() for _ in range(100_000))

    def request(
        self,
        path: str,
        method: str = "GET",
        body: bytes = b"",
        request_id: int = 1,
        keep_conn: bool = True,
        **extra: str,
    ) -> Result:
        self.begin(request_id, params_for(path, method, body, **extra), body, keep_conn)
        return self.result(request_id)


def fcgi_get(address: tuple[str, int] | str, path: str, **kw: object) -> Result:
    """One request on a new connection."""
    with FCGIClient(address) as client:
        return client.request(path, **kw)  # type: ignore[arg-type]


def scgi_request(
    address: tuple[str, int] | str,
    path: str,
    method: str = "GET",
    body: bytes = b"",
    timeout: float = 10,
    **extra: str,
) -> bytes:
    """One SCGI request; the raw CGI response, read until the server closes."""
    params = params_for(path, method, body, **extra)
    params.pop("CONTENT_LENGTH", None)
    headers = [(b"CONTENT_LENGTH", str(len(body)).encode()), (b"SCGI", b"1")]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in params.items()]
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(scgi.encode_request(headers, body))
        chunks = []
        while True:
            data = sock.recv(262144)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def raw_echo(request) -> int:  # type: ignore[no-untyped-def]
    """A raw handler (``--raw-handler tests.fcgi_client:raw_echo``) for the server tests:
    echoes the body with the method, writes a line to stderr, returns app status 7."""
    body = request.stdin.read()
    request.stderr.write(f"raw handler saw {len(body)} bytes\n")
    method = request.environ["REQUEST_METHOD"].encode()
    out = method + b" " + body
    request.stdout.write(b"Status: 201 Created\r\nContent-Type: text/plain\r\n")
    request.stdout.write(b"Content-Length: %d\r\n\r\n" % len(out))
    request.stdout.write(out)
    return 7
