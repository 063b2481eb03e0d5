"""A bounded load driver for the restart tests: real client threads on real sockets.

``Load(address).run_while(action)`` starts the clients, waits until they have had some
answers, runs ``action`` (restart the workers, send a SIGHUP, kill one...), keeps the load
going a little longer, stops, and returns a :class:`Report` of every request.

Each client sends GET requests one after the other until the driver stops it, or until the
request budget or the deadline runs out (every loop is bounded). Half of the clients (by
default) keep their connection alive, the others open one per request. A request counts as
failed on any connection error, a timeout, a status other than 2xx, or a body that is cut or
not the one expected; failures are kept with what happened.

One case is not a failure: a keep-alive connection the server closed while idle, found
closed when the next request is written or before any byte of its answer arrives. HTTP lets
a client resend an idempotent request then (RFC 9112, section 9.3.1) and every browser and
HTTP library does; the driver does it once, on a new connection, and counts it in
``retried``. A second failure in a row is a failure.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.conftest import Conn, Cut


@dataclass
class Failure:
    at: float  # seconds since the load started
    client: int
    what: str
    port: int | None = None  # the client's local port, when a connection was open


@dataclass
class Report:
    sent: int = 0
    ok: int = 0
    retried: int = 0
    failures: list[Failure] = field(default_factory=list)
    max_latency: float = 0.0
    max_latency_at: float = 0.0
    bodies: Counter[bytes] = field(default_factory=Counter)  # answers, by body
    last_bodies: dict[int, bytes] = field(default_factory=dict)  # per client, the latest
    duration: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def summary(self) -> str:
        lines = [
            f"requests sent {self.sent}, ok {self.ok}, failed {self.failed}, "
            f"retried on a closed keep-alive connection {self.retried}, "
            f"max latency {self.max_latency * 1000:.0f} ms "
            f"(at {self.max_latency_at:.2f} s of {self.duration:.2f} s)"
        ]
        lines += [
            f"  failed at {f.at:.3f} s, client {f.client} (port {f.port}): {f.what}"
            for f in self.failures
        ]
        return "\n".join(lines[:30])


class _Retry(Exception):
    """The idle keep-alive connection was found closed before any answer: resend."""


class Load:
    """Clients sending ``GET path`` to ``address`` until stopped (bounded by ``max_requests``
    in all and ``max_seconds``)."""

    def __init__(
        self,
        address: tuple[str, int] | str,
        path: str = "/",
        *,
        clients: int = 4,
        keepalive: int | None = None,  # how many of the clients keep connections alive
        expect: Callable[[bytes], bool] | None = None,
        host: str = "localhost",
        timeout: float = 15.0,
        pause: float = 0.002,  # between two requests of one client: steady, not flooding
        max_requests: int = 20_000,
        max_seconds: float = 60.0,
    ) -> None:
        self.address = address
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").encode("latin-1")
        self.clients = clients
        self.keepalive = clients // 2 if keepalive is None else keepalive
        self.expect = expect
        self.timeout = timeout
        self.pause = pause
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = 0.0

    # -- running --

    def start(self) -> Load:
        self._started = time.monotonic()
        for n in range(self.clients):
            thread = threading.Thread(
                target=self._client, args=(n, n < self.keepalive), daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def halt(self) -> None:
        """Start no new request; those on their way go on (``stop`` then waits for them)."""
        self._stop.set()

    def stop(self) -> Report:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
            if thread.is_alive():
                raise AssertionError("a load client did not stop")
        self.report.duration = time.monotonic() - self._started
        return self.report

    def wait_answers(self, count: int, timeout: float = 20) -> None:
        """Until ``count`` more requests were answered (any failure so far stops the wait)."""
        target = self.report.ok + count
        deadline = time.monotonic() + timeout
        while self.report.ok < target:
            if self.report.failures:
                raise AssertionError("load failed before the action:\n" + self.report.summary())
            if time.monotonic() > deadline or self._stop.is_set():
                raise AssertionError(f"load: {count} answers not reached\n{self.report.summary()}")
            time.sleep(0.02)

    def run_while(self, action: Callable[[], object], before: int = 50, after: int = 100) -> Report:
        """Load, ``before`` answers, ``action()``, ``after`` more answers, stop."""
        self.start()
        try:
            self.wait_answers(before)
            action()
            self.wait_answers_after(after)
        finally:
            report = self.stop()
        return report

    def wait_answers_after(self, count: int, timeout: float = 30) -> None:
        """Like ``wait_answers`` but failures do not stop the wait (they are reported)."""
        target = self.report.ok + count
        deadline = time.monotonic() + timeout
        while self.report.ok < target and time.monotonic() < deadline:
            if self._stop.is_set():
                return
            time.sleep(0.02)

    # -- one client --

    def _client(self, n: int, keepalive: bool) -> None:
        conn: Conn | None = None
        reused = False
        deadline = self._started + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if self.report.sent >= self.max_requests:
                        return
                    self.report.sent += 1
                began = time.monotonic()
                retried = False
                for _attempt in range(2):
                    if conn is None:
                        reused = False
                        try:
                            conn = Conn(self.address, timeout=self.timeout)
                        except OSError as exc:
                            self._fail(n, f"connect: {exc!r}")
                            break
                    try:
                        body, closing = self._exchange(conn, reused, keepalive)
                    except _Retry:
                        conn.sock.close()
                        conn = None
                        retried = True
                        continue
                    except (OSError, AssertionError, ValueError) as exc:
                        port = _local_port(conn)
                        conn.sock.close()
                        conn = None
                        what = f"{'reused' if reused else 'new'} connection: {exc!r}"
                        self._fail(n, what, port)
                        break
                    self._answered(n, body, time.monotonic() - began, retried)
                    if not keepalive or closing:
                        conn.sock.close()
                        conn = None
                    reused = conn is not None
                    break
                if self.pause:
                    time.sleep(self.pause)
        finally:
            if conn is not None:
                conn.sock.close()

    def _exchange(self, conn: Conn, reused: bool, keepalive: bool) -> tuple[bytes, bool]:
        """One request and its answer: (body, whether the server closes the connection)."""
        request = self.request
        if not keepalive:
            request = request[:-2] + b"Connection: close\r\n\r\n"
        try:
            conn.send(request)
            answered = bool(conn.buf) or conn.more()  # more() reads a reset as the end
        except (ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            answered = False
        if not answered:
            if reused:
                raise _Retry()
            raise Cut("closed before any answer")
        response = conn.response()
        if not 200 <= response.status < 300:
            raise AssertionError(f"status {response.status}: {response.body[:200]!r}")
        if self.expect is not None and not self.expect(response.body):
            raise AssertionError(f"unexpected body {response.body[:200]!r}")
        return response.body, (response.header("Connection") or "").lower() == "close"

    # -- bookkeeping --

    def _answered(self, n: int, body: bytes, latency: float, retried: bool) -> None:
        with self._lock:
            report = self.report
            report.ok += 1
            report.retried += retried
            report.bodies[body] += 1
            report.last_bodies[n] = body
            if latency > report.max_latency:
                report.max_latency = latency
                report.max_latency_at = time.monotonic() - self._started

    def _fail(self, n: int, what: str, port: int | None = None) -> None:
        with self._lock:
            at = time.monotonic() - self._started
            self.report.failures.append(Failure(at, n, what, port))


def _local_port(conn: Conn) -> int | None:
    try:
        name = conn.sock.getsockname()
    except OSError:
        return None
    return name[1] if isinstance(name, tuple) else None
