"""Signals -> stop / restart / reopen, with a graceful timeout.

Signal handlers only record the signal (and wake the main loop through a pipe set with
``signal.set_wakeup_fd``); the main loop acts:

- SIGTERM, SIGINT: stop accepting, wait for in-flight requests up to --graceful-timeout,
  exit 0 (1 if requests had to be cut). During that wait a SIGINT (the second Ctrl-C) or a
  SIGQUIT exits at once.
- SIGQUIT: exit at once.
- SIGHUP (and the reloader): drain like SIGTERM, then re-exec this same command line with
  the listening socket handed over, so the pid stays and no connection is refused: while
  we drain and restart, new connections wait in the listen queue.
- SIGUSR1: reopen log files.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from chaussette import logs, systemd
from chaussette.errors import EXIT_OK, EXIT_RUNTIME

if TYPE_CHECKING:
    from chaussette.backends.base import Server
    from chaussette.settings import Settings
    from chaussette.sockets import Listener

log = logging.getLogger("chaussette")

RELOAD = "reload"  # posted by the reloader thread
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)


class Signals:
    """Record signals and wake whoever waits; the waiting is done by the main thread."""

    def __init__(self) -> None:
        self.pending: collections.deque[int | str] = collections.deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._previous: dict[int, object] = {}
        self._previous_fd = -1

    def install(self, signums: Iterable[int] = HANDLED) -> None:
        self._previous_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._record)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_fd)
        for fd in (self._r, self._w):
            os.close(fd)

    def _record(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def post(self, what: str) -> None:
        """From another thread: queue an event and wake the main loop."""
        self.pending.append(what)
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass

    def wait(self, timeout: float | None) -> int | str | None:
        if not self.pending:
            select.select([self._r], [], [], timeout)
            try:
                while os.read(self._r, 512):
                    pass
            except BlockingIOError:
                pass
        return self.pending.popleft() if self.pending else None


def serve(server: Server, listener: Listener, settings: Settings) -> int:
    """Serve until told to stop; returns the exit code (or re-execs and never returns)."""
    signals = Signals()
    signals.install()
    stop_watching = threading.Event()
    try:
        server.start()
        systemd.notify("READY=1")
        if settings.use_reloader:
            start_reloader(settings, signals, stop_watching)
        while True:
            event = signals.wait(None)
            if event in (signal.SIGTERM, signal.SIGINT):
                name = signal.Signals(event).name  # type: ignore[arg-type]
                log.info("%s: stopping (graceful timeout %ss)", name, settings.graceful_timeout)
                systemd.notify("STOPPING=1")
                return drain(server, signals, settings.graceful_timeout)
            if event == signal.SIGQUIT:
                log.info("SIGQUIT: exiting now, %d requests in flight", server.in_flight())
                systemd.notify("STOPPING=1")
                return _exit_now(server)
            if event in (signal.SIGHUP, RELOAD):
                why = "SIGHUP" if event == signal.SIGHUP else "code changed"
                log.info("%s: restarting in place (graceful timeout %ss)", why,
                         settings.graceful_timeout)
                systemd.notify("RELOADING=1")
                drain(server, signals, settings.graceful_timeout)
                stop_watching.set()
                reexec(server, listener)
            if event == signal.SIGUSR1:
                count = logs.reopen()
                log.info("SIGUSR1: reopened %d log file(s)", count)
    finally:
        stop_watching.set()
        signals.restore()


def drain(server: Server, signals: Signals, timeout: float) -> int:
    server.stop_accepting()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if server.wait_idle(max(0.0, min(left, 0.1))):
            log.info("all requests finished")
            return EXIT_OK
        if left <= 0:
            log.warning("graceful timeout (%ss) passed: cutting %d request(s)", timeout,
                        server.in_flight())
            return EXIT_RUNTIME
        event = signals.wait(0)
        if event in (signal.SIGINT, signal.SIGQUIT):
            name = signal.Signals(event).name  # type: ignore[arg-type]
            log.warning("%s while draining: exiting now, cutting %d request(s)", name,
                        server.in_flight())
            return _exit_now(server)
        if event == signal.SIGUSR1:
            logs.reopen()


def _exit_now(server: Server) -> int:
    cut = server.in_flight()
    logging.shutdown()
    os._exit(EXIT_RUNTIME if cut else EXIT_OK)


def reexec(server: Server, listener: Listener) -> None:
    """Replace this process with a fresh run of the same command line, same socket."""
    server.close()
    listener.hand_over()
    argv = list(sys.orig_argv)
    log.info("re-executing: %s", " ".join(argv))
    logging.shutdown()
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        log.error("re-exec of %s failed: %s", sys.executable, exc)
        os._exit(EXIT_RUNTIME)


def start_reloader(settings: Settings, signals: Signals, stop: threading.Event) -> None:
    """Watch Python files; on the first change, ask the main loop to restart in place."""
    from watchfiles import PythonFilter, watch  # checked by the CLI before we get here

    paths = [os.getcwd(), *settings.python_path]
    app = settings.app
    if app.endswith((".py", ".wsgi")) or os.sep in app:
        paths.append(os.path.dirname(os.path.abspath(app.split(":", 1)[0])))
    paths = [p for p in dict.fromkeys(os.path.abspath(p) for p in paths) if os.path.isdir(p)]

    def run() -> None:
        for changes in watch(*paths, watch_filter=PythonFilter(), stop_event=stop,
                             raise_interrupt=False):
            changed = sorted({path for _, path in changes})
            log.info("reloader: %s changed", ", ".join(changed[:3]))
            signals.post(RELOAD)
            return

    threading.Thread(target=run, name="chaussette-reloader", daemon=True).start()
    log.info("reloader watching %s", ", ".join(paths))
