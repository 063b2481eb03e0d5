"""The ``waitress`` backend: waitress's HTTP/1.1 channels and task threads on our socket.

- The listening socket (inherited or bound by us) goes to ``waitress.create_server(
  sockets=[sock])``, created without ``listen()`` being called again: an inherited socket
  keeps the backlog its manager gave it, a bound one has ``--backlog``.
- waitress's asyncore loop runs in a background thread; ``--threads`` task threads run the
  app. Request bodies are read whole by the loop (spooled to a temp file past 512 KiB)
  before the app runs; chunked bodies arrive de-chunked, with a CONTENT_LENGTH.
- Drain (waitress has no graceful stop of its own): the loop stops accepting, closes every
  idle keep-alive connection at once, gives one accepted but still silent ``FRESH_GRACE``
  seconds to send its first request (its client sent it or is about to: closing it would
  fail a request no other worker can take over), never closes one with request bytes
  received, answers in-flight requests with ``Connection: close`` and closes their
  connections once flushed; it is done when no connection is busy (a request queued,
  running, partly received or a response not yet flushed) or waiting for its grace, and
  no task thread works.
- Settings: ``--timeout`` is waitress's ``channel_timeout`` (an idle or stalled connection
  is closed); ``--limit-request-headers`` its ``max_request_header_size`` (431, the request
  line included); a longer request line than ``--limit-request-line`` gets 414.
- TCP_NODELAY: waitress sets it on every accepted TCP connection (its default options).
- The app sees the client's proxy headers (X-Forwarded-*, Forwarded) as every other
  backend passes them: trusting them is the app's decision, not the launcher's.
- Logs: waitress's loggers propagate to ours (an app error is logged there with its
  traceback and answered 500); its "Task queue depth" warning, one per request that waits
  for a free thread, is kept for ``--log-level debug``. One access line per response goes to
  ``chaussette.access`` (only with ``--access-log``).
- environ: waitress's, with ``wsgi.errors`` going to our log; on a unix socket
  REMOTE_ADDR, SERVER_NAME and SERVER_PORT are set as the wsgiref backend sets them.
- Like our own WSGI host, waitress refuses a hop-by-hop header from the app (500).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from typing import Any

from waitress import wasyncore
from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.channel import ClientDisconnected, HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import Error, InternalServerError

from chaussette.backends.base import FRESH_GRACE, Server, pending_bytes
from chaussette.wsgi import ErrorStream

log = logging.getLogger("chaussette")
access = logging.getLogger("chaussette.access")

LOOP_TIMEOUT = 1.0  # seconds the loop sleeps with nothing to do (waitress's own default)
DRAIN_TICK = 0.05  # while draining, how often idle connections are looked for
THREAD_WAIT = 5.0  # bound on waiting for the loop thread to act on a stop


class URITooLong(Error):  # type: ignore[misc]
    code = 414
    reason = "URI Too Long"


class HeadFileWrapper(ReadOnlyFileBasedBuffer):  # type: ignore[misc]
    """``wsgi.file_wrapper`` of a HEAD request: the file is measured, never sent."""

    def prepare(self, size: int | None = None) -> int:
        length: int = super().prepare(size)
        if length:
            self.close()  # waitress leaves it to the channel, which gets nothing to send
        return length

    def __len__(self) -> int:
        return 0


def _classes(max_line: int, unix_path: str | None, draining: threading.Event) -> type:
    """A channel class for one server: its parser, tasks and what they need to know."""

    class Parser(HTTPRequestParser):  # type: ignore[misc]
        error: Any
        completed: bool
        first_line: bytes

        def parse_header(self, header_plus: bytes) -> None:
            # once per request (received() is called for every 8 KiB of a body)
            super().parse_header(header_plus)
            if len(self.first_line) > max_line:
                self.error = URITooLong(f"request line longer than {max_line} bytes")
                self.completed = True

    class Logged:
        """One access line per response (only when chaussette.access is on)."""

        channel: Any
        request: Any
        version: str
        status: str
        has_body: bool
        close_on_finish: bool
        wrote_header: bool
        content_length: int | None
        content_bytes_written: int
        chunked_response: bool
        body_bytes = 0

        def service(self) -> None:
            started = time.monotonic()
            try:
                super().service()  # type: ignore[misc]
            except ClientDisconnected:
                self._log_access(started, self.status)
                raise
            except Exception:
                # before the headers, the channel answers 500 with a task of its own
                self._log_access(started, self.status if self.wrote_header else "500")
                raise
            if not isinstance(self.request.error, InternalServerError):  # logged above
                self._log_access(started, self.status)

        def write(self, data: bytes) -> None:
            super().write(data)  # type: ignore[misc]
            if self.chunked_response:
                self.body_bytes += len(data)

        def _log_access(self, started: float, status: str) -> None:
            if not access.isEnabledFor(logging.INFO):
                return
            request = self.request
            headers = request.headers
            if self.chunked_response:
                size = self.body_bytes
            else:  # a file wrapper's bytes go out without write(): count the length
                size = self.content_bytes_written or self.content_length or 0
            command = getattr(request, "command", None) or "-"
            if command == "HEAD" or not self.wrote_header:
                size = 0
            access.info(
                '%s - - [%s] "%s %s HTTP/%s" %s %s "%s" "%s" %.3f',
                unix_path or self.channel.addr[0],
                time.strftime("%d/%b/%Y:%H:%M:%S %z"),
                command,
                getattr(request, "request_uri", None) or "-",
                request.version,
                status.split(" ", 1)[0],
                size or "-",
                headers.get("REFERER", "-"),
                headers.get("USER_AGENT", "-"),
                time.monotonic() - started,
            )

    class Task(Logged, WSGITask):  # type: ignore[misc]
        def get_environment(self) -> dict[str, Any]:
            if self.environ is not None:
                return self.environ  # type: ignore[no-any-return]
            environ: dict[str, Any] = super().get_environment()
            environ["wsgi.errors"] = ErrorStream()
            if self.request.command == "HEAD":
                environ["wsgi.file_wrapper"] = HeadFileWrapper
            if unix_path is not None:
                environ["REMOTE_ADDR"] = environ["REMOTE_HOST"] = unix_path
                environ.pop("REMOTE_PORT", None)
                host = environ.get("HTTP_HOST")
                if host:
                    environ["SERVER_NAME"] = host.rsplit(":", 1)[0] if "]" not in host else host
                else:
                    environ["SERVER_NAME"] = unix_path
                environ["SERVER_PORT"] = ""
            return environ

        def write(self, data: bytes) -> None:
            if data and self.request.command == "HEAD":
                data = b""  # waitress would send a HEAD response's body (RFC 9110: never)
            if self.wrote_header or not data:
                super().write(data)
                return
            # waitress sends the head, then the first piece of the body: two sends, two
            # TCP segments (TCP_NODELAY). Both are ready now: they go out as one.
            channel = self.channel
            channel.held = []
            try:
                super().write(data)
            finally:
                held, channel.held = channel.held, None
            if held:
                HTTPChannel.write_soon(channel, held[0] if len(held) == 1 else b"".join(held))

        def finish(self) -> None:
            if self.request.command == "HEAD":
                if not self.wrote_header:
                    self.write(b"")
                self.chunked_response = False  # nor the last chunk of an empty body
            super().finish()

        def build_response_header(self) -> bytes:
            if draining.is_set():  # this connection is closed after the response
                self.request.headers["CONNECTION"] = "close"
            keep = (
                self.version == "1.1"
                and not self.close_on_finish
                and self.request.headers.get("CONNECTION", "").lower() != "close"
            )
            head: bytes = super().build_response_header()
            if keep and self.close_on_finish and (self.chunked_response or not self.has_body):
                # waitress closes after every HTTP/1.1 response without a Content-Length,
                # but a chunked body (or none: 1xx, 204, 304) is framed without one
                self.close_on_finish = False
                head = head.replace(b"\r\nConnection: close\r\n", b"\r\n", 1)
            return head

    class LoggedErrorTask(Logged, ErrorTask):  # type: ignore[misc]
        pass

    class Channel(HTTPChannel):  # type: ignore[misc]
        parser_class = Parser
        task_class = Task
        error_task_class = LoggedErrorTask
        held: list[bytes] | None = None  # a response's head, while its task holds it
        heard = False  # a byte was received on it (it is no longer a silent new one)

        def received(self, data: bytes) -> bool:
            if data:
                self.heard = True
            return super().received(data)  # type: ignore[no-any-return]

        def write_soon(self, data: Any) -> int:
            held = self.held
            if held is None or type(data) is not bytes:
                return super().write_soon(data)  # type: ignore[no-any-return]
            held.append(data)
            return len(data)

    return Channel


def _busy(channel: Any) -> bool:
    """Is a request queued, running, partly received, or a response not yet flushed?"""
    if channel.will_close:
        return False  # closing at the next turn of the loop, whatever it holds
    return bool(
        channel.requests
        or channel.request is not None
        or channel.total_outbufs_len
        or channel.close_when_flushed
    )


class WaitressServer(Server):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        s = self.settings
        sock = self.listener.sock
        self.unix_path = None
        if sock.family == socket.AF_UNIX:
            self.unix_path = self.listener.unix_path() or ""
            server_name = self.unix_path
        else:
            server_name = str(sock.getsockname()[0])
        timeout = max(1, math.ceil(s.timeout))
        self.map: dict[int, Any] = {}
        self.draining = threading.Event()
        self.drain_started = 0.0
        self.drained = threading.Event()
        self.busy = 0
        self.stopping = False
        self.closed = False
        self.thread: threading.Thread | None = None
        server = create_server(
            self.app,
            map=self.map,
            _start=False,  # no listen(): the socket is listening, with its own backlog
            sockets=[sock],
            threads=s.threads,
            channel_timeout=timeout,
            cleanup_interval=min(30, timeout),
            max_request_header_size=s.limit_request_headers,
            clear_untrusted_proxy_headers=False,
            asyncore_use_poll=True,  # select() fails on descriptors past 1023
            server_name=server_name,
        )
        if not isinstance(server, BaseWSGIServer):  # one socket gives one server
            raise TypeError(f"waitress made a {type(server).__name__} for one socket")
        self.server = server
        server.channel_class = _classes(s.limit_request_line, self.unix_path, self.draining)
        queue_log = logging.getLogger("waitress.queue")
        if s.log_config is None and queue_log.level == logging.NOTSET and s.log_level != "debug":
            queue_log.setLevel(logging.ERROR)

    # -- Server API --

    def start(self) -> None:
        self.server.accepting = True
        self.thread = threading.Thread(target=self._loop, name="chaussette-waitress", daemon=True)
        self.thread.start()

    def stop_accepting(self) -> None:
        done = threading.Event()

        def stop() -> None:
            self.server.accepting = False  # the listener is no longer polled
            self.drain_started = time.monotonic()
            self.draining.set()
            self._drain_step()
            done.set()

        if self.thread is not None and self.thread.is_alive():
            self.server.trigger.pull_trigger(stop)
            if not done.wait(THREAD_WAIT):
                log.error("the waitress loop did not stop accepting within %ss", THREAD_WAIT)
        else:
            stop()

    def wait_idle(self, timeout: float) -> bool:
        return self.drained.wait(timeout)

    def in_flight(self) -> int:
        if self.draining.is_set():
            return self.busy
        return sum(1 for ch in list(self.server.active_channels.values()) if ch.requests)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stopping = True
        if self.thread is not None and self.thread.is_alive():
            self.server.pull_trigger()
            self.thread.join(THREAD_WAIT)
            if self.thread.is_alive():
                log.error("the waitress loop did not stop within %ss", THREAD_WAIT)
                return
        self.server.task_dispatcher.set_thread_count(0)  # idle threads end; busy ones are daemons
        for obj in list(self.map.values()):
            if obj is self.server:
                continue
            try:
                if isinstance(obj, HTTPChannel):
                    obj.handle_close()
                else:
                    obj.close()  # the trigger's pipe
            except OSError:
                pass
        # Out of the map, not closed: the listening socket is the lifecycle's to close
        # (or to hand over to a re-exec).
        self.server.del_channel()

    # -- the loop thread --

    def _loop(self) -> None:
        try:
            while not self.stopping:
                draining = self.draining.is_set()
                wasyncore.poll2(DRAIN_TICK if draining else LOOP_TIMEOUT, self.map)
                if draining:
                    self._drain_step()
        except Exception:
            log.critical("the waitress loop failed; no request is served any more", exc_info=True)

    def _drain_step(self) -> None:
        """Close idle connections; note whether anything is left in flight."""
        busy = 0
        fresh = time.monotonic() - self.drain_started < FRESH_GRACE
        for channel in list(self.server.active_channels.values()):
            if _busy(channel):
                busy += 1
            elif (fresh and not channel.heard) or pending_bytes(channel.socket):
                busy += 1  # its first request may be on its way, or a request is here
            elif not channel.will_close:
                channel.will_close = True  # closed at the next turn of the loop
        tasks = self.server.task_dispatcher
        working = tasks.active_count + len(tasks.queue)
        self.busy = max(busy, working)
        if self.busy == 0:
            self.drained.set()
