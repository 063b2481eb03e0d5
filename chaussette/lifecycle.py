"""Signals -> stop / restart / reopen, with a graceful timeout.

Signal handlers only record the signal (and wake the main loop through a pipe set with
``signal.set_wakeup_fd``); the main loop acts:

- SIGTERM, SIGINT: stop accepting and close our copy of the listening socket (a unix socket
  file we created is removed then, so new clients are refused rather than left waiting), wait
  for in-flight requests up to --graceful-timeout, exit 0 (1 if requests had to be cut).
- SIGQUIT: exit at once.
- SIGHUP (and the reloader): drain like SIGTERM but keep the socket, then re-exec this same
  command line with the listening socket handed over, so the pid stays and no connection is
  refused: while we drain and restart, new connections wait in the listen queue. The handled
  signals are blocked across the ``execve()`` and unblocked as soon as the new image records
  them (when this module is imported, before the app is), so a signal sent while it starts is
  neither lost nor fatal. If ``execve()`` fails, the process stops (exit 1).
- SIGUSR1: reopen log files.

While a stop drains, a SIGINT (the second Ctrl-C) or a SIGQUIT exits at once. While a restart
drains, a SIGQUIT exits at once and a SIGTERM or SIGINT turns the restart into a stop.
Exiting at once still removes a unix socket file we created, but skips --post-hook.
"""

from __future__ import annotations

import _thread
import collections
import importlib.util
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NoReturn

from chaussette import logs, systemd
from chaussette.errors import EXIT_OK, EXIT_RUNTIME, MissingDependency
from chaussette.sockets import REEXEC_FD, REEXEC_OWNED, REEXEC_PID

if TYPE_CHECKING:
    from chaussette.backends.base import Server
    from chaussette.settings import Settings
    from chaussette.sockets import Listener

log = logging.getLogger("chaussette")

RELOAD = "reload"  # posted by the reloader thread
# Captured before any backend monkey-patches: the signal pipe is non-blocking and must stay
# so (eventlet's green os.read waits on an empty pipe instead of raising BlockingIOError),
# and the reloader must be a real OS thread (a greenlet would block the hub).
_start_os_thread = _thread.start_new_thread
_os_read = os.read
_os_write = os.write
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)
STOP = (signal.SIGTERM, signal.SIGINT)
POLL = 0.1  # seconds between two looks at the signals while draining


class Signals:
    """Record signals and wake whoever waits; the waiting is done by the main thread."""

    def __init__(self) -> None:
        self.pending: collections.deque[int | str] = collections.deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._closed = False
        # How the main thread blocks on the wake-up pipe; a greenlet backend swaps in a
        # cooperative wait (Server.wait_readable) so that its hub keeps running.
        self.wait_readable: Callable[[int, float | None], None] = _select_readable
        self.changed: list[str] = []  # files the reloader saw change, for the log

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self, signums: Iterable[int] = HANDLED) -> None:
        self._previous_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._record)

    def restore(self, ignore: Iterable[int] = ()) -> None:
        """Put the previous handlers back, except for ``ignore``: those are ignored from
        now on (a stopping process must not die of a manager's second SIGTERM)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if signum in ignore else handler)  # type: ignore[arg-type]
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_fd)
        self._closed = True
        for fd in (self._r, self._w):
            os.close(fd)

    def _record(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def post(self, what: str) -> None:
        """From another thread: queue an event and wake the main loop."""
        self.pending.append(what)
        if self._closed:
            return
        try:
            _os_write(self._w, b"\0")
        except OSError:
            pass

    def wait(self, timeout: float | None) -> int | str | None:
        if not self.pending:
            self.wait_readable(self._r, timeout)
            try:
                while _os_read(self._r, 512):
                    pass
            except BlockingIOError:
                pass
        return self.pending.popleft() if self.pending else None


def _select_readable(fd: int, timeout: float | None) -> None:
    select.select([fd], [], [], timeout)


def _early_signals() -> Signals | None:
    """In the image a re-exec started, record signals from the start, before the app is
    imported: they arrive blocked (see ``reexec``), and threads or subprocesses the app
    starts while it is imported must not inherit that mask."""
    if os.environ.get(REEXEC_PID) != str(os.getpid()):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    signals = Signals()
    signals.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    return signals


_early: Signals | None = _early_signals()


def adopt(signals: Signals) -> None:
    """Hand signals recorded since before the app was imported (a forked worker installs
    them first thing) to the next ``serve``."""
    global _early
    _early = signals


def _name(event: int | str) -> str:
    return signal.Signals(event).name if isinstance(event, int) else "code changed"


def serve(server: Server, listener: Listener, settings: Settings) -> int:
    """Serve until told to stop; returns the exit code (or re-execs and never returns)."""
    global _early
    signals, _early = _early or Signals(), None
    if not signals.installed:
        signals.install()
    signals.wait_readable = server.wait_readable
    # Signals a manager may have left blocked are ours to handle (a re-exec'd image has
    # unblocked them already, at import).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    watcher = None
    try:
        if settings.use_reloader:
            watcher = start_reloader(settings, signals)
        server.start()
        systemd.notify("READY=1")
        while True:
            event = signals.wait(None)
            if event in STOP:
                log.info(
                    "%s: stopping (graceful timeout %ss)", _name(event), settings.graceful_timeout
                )
                code, _ = drain(server, listener, signals, settings.graceful_timeout)
                return code
            if event == signal.SIGQUIT:
                log.info("SIGQUIT: exiting now, %d request(s) in flight", server.in_flight())
                _exit_now(server, listener)
            if event in (signal.SIGHUP, RELOAD):
                if event == RELOAD:
                    log.info("reloader: %s changed", ", ".join(signals.changed))
                log.info(
                    "%s: restarting in place (graceful timeout %ss)",
                    _name(event),
                    settings.graceful_timeout,
                )
                systemd.reloading()
                code, stop = drain(
                    server, listener, signals, settings.graceful_timeout, restarting=True
                )
                if watcher is not None:
                    watcher.set()
                if not stop:
                    failed = reexec(server, listener, signals)  # returns only if it did not
                    code = code if failed is None else failed
                listener.close()
                return code
            if event == signal.SIGUSR1:
                count = logs.reopen()
                log.info("SIGUSR1: reopened %d log file(s)", count)
    finally:
        if watcher is not None:
            watcher.set()
        signals.restore(ignore=(signal.SIGTERM,))


def drain(
    server: Server, listener: Listener, signals: Signals, timeout: float, restarting: bool = False
) -> tuple[int, bool]:
    """Stop accepting and wait for in-flight requests, acting on signals meanwhile.

    Returns the exit code (0, or 1 if requests were cut) and, for a restart, whether a
    stop was asked for while draining. A stop closes our copy of the listening socket at once.
    """
    server.stop_accepting()
    stop = not restarting
    if stop:
        # after stop_accepting: a --workers master reads it as "takes no new connection"
        systemd.notify("STOPPING=1")
        listener.close()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if server.wait_idle(max(0.0, min(left, POLL))):
            log.info("all requests finished")
            return EXIT_OK, stop
        if left <= 0:
            log.warning(
                "graceful timeout (%ss) passed: cutting %d request(s)", timeout, server.in_flight()
            )
            return EXIT_RUNTIME, stop
        event = signals.wait(0)
        if event == signal.SIGQUIT or (event == signal.SIGINT and stop):
            log.warning(
                "%s while draining: exiting now, cutting %d request(s)",
                _name(event),
                server.in_flight(),
            )
            _exit_now(server, listener)
        if event in STOP and not stop:
            log.info("%s while restarting: stopping instead", _name(event))
            systemd.notify("STOPPING=1")
            stop = True
            listener.close()
        elif event == signal.SIGUSR1:
            count = logs.reopen()
            log.info("SIGUSR1: reopened %d log file(s)", count)


def _exit_now(server: Server, listener: Listener) -> NoReturn:
    code = EXIT_RUNTIME if server.in_flight() else EXIT_OK
    systemd.notify("STOPPING=1")
    try:
        listener.close()  # removes a unix socket file we created
    except OSError:
        pass
    log.info("exiting now (exit %d)", code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def reexec(server: Server, listener: Listener, signals: Signals) -> int | None:
    """Replace this process with a fresh run of the same command line, same socket.

    Returns only when that does not happen and the process must stop instead: None when a
    stop signal came in at the last moment, EXIT_RUNTIME when ``execve()`` failed.
    """
    # From here, signals stay pending in the kernel and reach the new image. Blocking runs
    # the Python handlers of any signal already caught, so ``pending`` is complete.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    late = [event for event in signals.pending if event in (*STOP, signal.SIGQUIT)]
    if late:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        log.info("%s while restarting: stopping instead", _name(late[0]))
        systemd.notify("STOPPING=1")
        return None
    server.close()
    listener.hand_over()
    argv = list(sys.orig_argv)
    log.info("re-executing: %s", " ".join(argv))
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        for name in (REEXEC_FD, REEXEC_PID, REEXEC_OWNED):
            os.environ.pop(name, None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        log.error("re-exec of %s failed: %s; stopping", sys.executable, exc.strerror or exc)
        return EXIT_RUNTIME


def reloader_paths(settings: Settings) -> list[str]:
    """Directories the reloader watches: the working directory, --python-path, the app's."""
    paths = [*settings.python_path]
    cwd = os.getcwd()
    if cwd != os.sep:  # never watch a whole filesystem (a service started in /)
        paths.insert(0, cwd)
    app: str = settings.app
    if app.startswith("paste:"):
        paths.append(os.path.dirname(os.path.abspath(app[len("paste:") :].split("#", 1)[0])))
    elif app.endswith((".py", ".wsgi")) or os.sep in app:
        paths.append(os.path.dirname(os.path.abspath(app.split(":", 1)[0])))
    absolute = [os.path.abspath(p) for p in paths]
    return [p for p in dict.fromkeys(absolute) if os.path.isdir(p)]


def forget_bytecode(paths: Iterable[str]) -> None:
    """Remove the cached bytecode of changed sources. A .pyc is trusted when the source's
    mtime (whole seconds) and size match, so an edit of the same size within the same second
    would otherwise bring back the old code after the restart."""
    for path in paths:
        if not path.endswith(".py"):
            continue
        try:
            os.unlink(importlib.util.cache_from_source(path))
        except (OSError, ValueError, NotImplementedError):
            pass


class _Flag:
    """A stop flag for the watcher thread: a plain bool, no lock (a monkey-patched
    threading.Event must not be touched from a real OS thread)."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


def start_reloader(settings: Settings, signals: Signals) -> _Flag | None:
    """Watch Python files; on the first change, ask the main loop to restart in place.

    The watcher blocks in native code, so it runs on a real OS thread started with the
    ``_thread`` function captured when this module was imported, before any backend
    monkey-patched threading: a greenlet "thread" would block the whole hub. It touches no
    lock and no logger; it records what changed and wakes the main loop, which logs.
    """
    try:
        from watchfiles import PythonFilter, watch
    except ImportError:
        raise MissingDependency("--use-reloader", "watchfiles", "reload") from None

    paths = reloader_paths(settings)
    if not paths:
        log.warning("reloader: nothing to watch (working directory /, no --python-path)")
        return None
    flag = _Flag()

    def run() -> None:
        for changes in watch(
            *paths, watch_filter=PythonFilter(), stop_event=flag, raise_interrupt=False
        ):
            changed = sorted({path for _, path in changes})
            forget_bytecode(changed)
            signals.changed = changed
            signals.post(RELOAD)
            return

    _start_os_thread(run, ())
    log.info("reloader watching %s", ", ".join(paths))
    return flag
