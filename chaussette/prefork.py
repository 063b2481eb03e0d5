"""--workers N: a small pre-fork master for running without a process manager.

The master binds (or adopts) the listening socket, then forks N workers. Each worker
prepares itself (monkey-patching happens there, after the fork), loads the application and
serves the shared socket through the ordinary lifecycle, so a worker is exactly a
single-process chaussette that did not bind its own socket. The master serves nothing; it
only watches its workers:

- A worker tells the master it serves by the same ``READY=1`` it would send to systemd:
  its NOTIFY_SOCKET is the master's datagram socket, whose kernel credentials name the
  sender. The master forwards nothing of it; it says READY=1 to systemd itself once all
  workers serve. A worker's ``STOPPING=1`` (sent once it accepts no more) tells the master
  that its drain has begun.
- A new generation starts with one worker; the others are forked once it serves. A broken
  application is therefore loaded, and its traceback shown, once.
- A worker that dies is replaced. When no worker serves, one that dies before serving with
  exit 2 or 3 (a usage error, an application that cannot be loaded) stops everything: the
  master exits with that code, never forking in a loop; other deaths before serving are
  retried with a growing delay, at most ``START_FAILURES`` times in a row. While other
  workers serve, the master never gives up: it retries with a growing delay (at most
  ``MAX_DELAY``), and the service goes on with fewer workers meanwhile.
- SIGTERM, SIGINT: SIGTERM to every worker, the master's copy of the socket closed (a unix
  socket file we created is removed: new clients are refused), then wait for the workers
  up to --graceful-timeout (+ ``KILL_MARGIN``), SIGKILL after that. Exit 0 when every worker
  stopped cleanly, 1 otherwise. A second SIGINT, or SIGQUIT: SIGQUIT to every worker.
- SIGHUP: RELOADING=1 to systemd; a new generation is forked; when all of it serves, the old
  workers get SIGTERM and drain; READY=1 once none of them accepts any more (every new
  connection meets the new code from then on). If the new one cannot start, the old workers
  are kept.
- SIGTTIN / SIGTTOU: one worker more / less. SIGUSR1: reopen log files, here and in workers.

Signal handlers only record (``lifecycle.Signals``); the loop acts. Forks happen with the
master's signals blocked; the child puts the master's handlers back, closes the master's
descriptors and records its own signals from its first instruction, so a signal sent to a
new worker is neither lost nor handled as if it were the master's. Workers ignore SIGHUP:
replacing them is the master's job.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chaussette import lifecycle, logs, systemd
from chaussette.errors import EXIT_APP, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, UsageError

if TYPE_CHECKING:
    from chaussette.settings import Settings
    from chaussette.sockets import Listener

log = logging.getLogger("chaussette")

MASTER_SIGNALS = (*lifecycle.HANDLED, signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU)
WORKER_SIGNALS = tuple(s for s in lifecycle.HANDLED if s != signal.SIGHUP)
FATAL = (EXIT_USAGE, EXIT_APP)  # a worker exiting so before it serves stops the master
START_FAILURES = 5  # other deaths before serving, in a row, before the master gives up
MAX_DELAY = 30.0  # longest wait before forking again after workers died before serving
KILL_MARGIN = 2.0  # seconds past --graceful-timeout before SIGKILL (workers cut at it)
QUIT_TIMEOUT = 5.0  # seconds workers get to exit after SIGQUIT
TICK = 1.0  # longest sleep of the master loop
_UCRED = struct.Struct("iII")  # pid, uid, gid of SCM_CREDENTIALS


@dataclass
class Worker:
    pid: int
    generation: int
    ready: bool = False
    retiring: bool = False  # told to stop; not to be replaced
    accepting: bool = True  # until it says STOPPING=1: then it takes no new connection


def check(settings: Settings) -> None:
    """Refuse what --workers cannot do, before anything starts."""
    if settings.workers and settings.use_reloader:
        raise UsageError(
            "--workers and --use-reloader cannot be used together: send SIGHUP to the "
            "master to replace its workers"
        )


def run(settings: Settings, listener: Listener, worker: Callable[[], int]) -> int:
    """Fork ``settings.workers`` processes running ``worker()`` and watch them until told
    to stop; returns the master's exit code."""
    return Master(settings, listener, worker).run()


class Master:
    def __init__(self, settings: Settings, listener: Listener, worker: Callable[[], int]) -> None:
        self.settings = settings
        self.listener = listener
        self.worker = worker
        self.target: int = settings.workers
        self.workers: dict[int, Worker] = {}
        self.generation = 1
        self.proven = False  # a worker of this generation has served
        self.reloading = False
        self.failures = 0  # workers in a row that died before serving
        self.next_spawn = 0.0
        self.stopping = False
        self.kill_at = 0.0
        self.killed = False
        self.code = EXIT_OK
        self.announced = False  # READY=1 sent to systemd for this generation
        self.signals = lifecycle.Signals()
        self.notes = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_address = f"@chaussette-{os.getpid()}-{secrets.token_hex(6)}"

    # -- the loop --

    def run(self) -> int:
        try:
            self.notes.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.notes.bind("\0" + self.notify_address[1:])
            self.notes.setblocking(False)
            self.signals.install(MASTER_SIGNALS)
            self.signals.wait_readable = self._wait_readable
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            log.info("master (pid %d): starting %d worker(s)", os.getpid(), self.target)
            return self._loop()
        finally:
            self._kill_all()  # only workers left by an exception of our own
            if self.signals.installed:
                self.signals.restore(ignore=(signal.SIGTERM,))
            self.notes.close()

    def _loop(self) -> int:
        while True:
            self._reap()
            self._read_notes()
            if self.stopping:
                if not self.workers:
                    return self.code
                if time.monotonic() >= self.kill_at and not self.killed:
                    log.warning(
                        "%d worker(s) still running past the timeout: SIGKILL", len(self.workers)
                    )
                    self.killed = True
                    self._signal_all(signal.SIGKILL)
                    self.code = self.code or EXIT_RUNTIME
            else:
                self._retire_old()
                self._spawn_missing()
            self._act(self.signals.wait(self._timeout()))

    def _timeout(self) -> float:
        now = time.monotonic()
        if self.stopping:
            return max(0.0, min(TICK, self.kill_at - now)) if not self.killed else 0.1
        if self.next_spawn > now:
            return min(TICK, self.next_spawn - now)
        return TICK

    def _wait_readable(self, fd: int, timeout: float | None) -> None:
        select.select([fd, self.notes.fileno()], [], [], timeout)

    def _act(self, event: int | str | None) -> None:
        if event is None or event == signal.SIGCHLD:
            return
        name = signal.Signals(event).name if isinstance(event, int) else str(event)
        if event in lifecycle.STOP:
            if not self.stopping:
                self._stop(name)
            elif event == signal.SIGINT:
                self._quit(name)
        elif event == signal.SIGQUIT:
            self._quit(name)
        elif self.stopping:
            return
        elif event == signal.SIGHUP:
            log.info("SIGHUP: replacing %d worker(s)", len(self.current()))
            self.generation += 1
            self.proven = self.announced = False
            self.reloading = True
            self.failures = 0
            systemd.reloading()
        elif event == signal.SIGTTIN:
            self.target += 1
            log.info("SIGTTIN: %d worker(s)", self.target)
        elif event == signal.SIGTTOU:
            if self.target > 1:
                self.target -= 1
                current = self.current()
                if len(current) > self.target:
                    # the newest first: a worker still starting, else the youngest
                    self._retire(min(current, key=lambda w: (w.ready, -w.pid)))
            log.info("SIGTTOU: %d worker(s)", self.target)
        elif event == signal.SIGUSR1:
            count = logs.reopen()
            log.info("SIGUSR1: reopened %d log file(s); telling the workers", count)
            self._signal_all(signal.SIGUSR1)

    # -- stopping --

    def _stop(self, name: str) -> None:
        self.stopping = True
        timeout = self.settings.graceful_timeout
        self.kill_at = time.monotonic() + timeout + KILL_MARGIN
        log.info(
            "%s: stopping %d worker(s) (graceful timeout %ss)", name, len(self.workers), timeout
        )
        systemd.notify("STOPPING=1")
        self._signal_all(signal.SIGTERM)
        for w in self.workers.values():
            w.retiring = True
        # as a single process does: no new client waits in a queue nobody will accept from
        self.listener.close()

    def _quit(self, name: str) -> None:
        if not self.stopping:
            self._stop(name)
        log.warning("%s: workers exit now", name)
        self.kill_at = min(self.kill_at, time.monotonic() + QUIT_TIMEOUT)
        self._signal_all(signal.SIGQUIT)

    def _kill_all(self) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.workers.pop(pid, None)

    def _signal_all(self, signum: int) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # exited; reaped on the next turn

    # -- workers --

    def current(self) -> list[Worker]:
        return [
            w for w in self.workers.values() if w.generation == self.generation and not w.retiring
        ]

    def _retire(self, w: Worker) -> None:
        w.retiring = True
        try:
            os.kill(w.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _retire_old(self) -> None:
        """Once the new generation serves in full, the old one drains."""
        ready = [w for w in self.current() if w.ready]
        if len(ready) < self.target:
            return
        old = [
            w for w in self.workers.values() if w.generation < self.generation and not w.retiring
        ]
        for w in old:
            self._retire(w)
        if self.reloading:
            self.reloading = False
            log.info("%d new worker(s) serving; %d old one(s) draining", len(ready), len(old))
        if not self.announced and not any(
            w.accepting for w in self.workers.values() if w.generation < self.generation
        ):
            # READY=1 after a reload: every new connection meets the new code
            self.announced = True
            systemd.notify("READY=1")

    def _spawn_missing(self) -> None:
        if time.monotonic() < self.next_spawn:
            return
        current = self.current()
        # until one worker of this generation serves, start only one
        wanted = self.target if self.proven else 1
        for _ in range(wanted - len(current)):
            if not self._spawn():
                return

    def _spawn(self) -> bool:
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            log.error("cannot fork a worker: %s; retrying in 1 s", exc.strerror or exc)
            self.next_spawn = time.monotonic() + 1.0
            return False
        if pid == 0:
            self._child()  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        self.workers[pid] = Worker(pid, self.generation)
        log.info("worker %d started", pid)
        return True

    def _child(self) -> None:
        code = EXIT_RUNTIME
        try:
            # The master's handlers and descriptors are not ours; signals stay blocked
            # until ours record them.
            self.signals.restore()
            self.notes.close()
            self.listener.owned_path = self.listener.owned_id = None  # the master's file
            os.environ["NOTIFY_SOCKET"] = self.notify_address
            signals = lifecycle.Signals()
            signals.install(WORKER_SIGNALS)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            lifecycle.adopt(signals)  # lifecycle.serve takes over these records
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            code = self.worker()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else EXIT_RUNTIME
        except BaseException:
            traceback.print_exc()
            code = EXIT_RUNTIME
        finally:
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    def _reap(self) -> None:
        for pid in list(self.workers):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._exited(self.workers.pop(pid), os.waitstatus_to_exitcode(status))

    def _exited(self, w: Worker, code: int) -> None:
        how = f"exit {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        expected = self.stopping or w.retiring or w.generation != self.generation
        if expected:
            log.info("worker %d exited (%s)", w.pid, how)
            if self.stopping and code != EXIT_OK and self.code == EXIT_OK:
                self.code = EXIT_RUNTIME
            return
        if w.ready:
            log.warning("worker %d exited (%s); starting another", w.pid, how)
            return
        self.failures += 1
        if code == EXIT_APP:
            message = f"worker {w.pid} could not load the application ({how})"
        elif code in FATAL:
            message = f"worker {w.pid} could not start ({how})"
        else:
            message = f"worker {w.pid} exited before serving ({how})"
        give_up = code in FATAL or self.failures >= START_FAILURES
        serving = [x for x in self.workers.values() if x.ready and not x.retiring]
        if give_up and self.reloading and serving:
            self._keep_previous(message)
        elif give_up and not serving:
            if code not in FATAL:
                message = f"{self.failures} workers in a row exited before serving"
            log.error("%s: stopping", message)
            self._stop("worker failure")
            self.code = code if code in FATAL else EXIT_RUNTIME
        else:
            # never a fork loop: each retry waits longer; with workers still serving, the
            # service goes on with fewer of them meanwhile
            delay = min(0.05 * 2**self.failures, MAX_DELAY)
            log.error("%s; %d serving; retrying in %.1f s", message, len(serving), delay)
            self.next_spawn = time.monotonic() + delay

    def _keep_previous(self, message: str) -> None:
        """A reload whose new workers cannot start: the old ones stay the current ones."""
        log.error("%s; keeping the previous workers", message)
        for x in self.current():
            self._retire(x)
        for x in self.workers.values():
            if not x.retiring:
                x.generation = self.generation
        self.reloading = False
        self.proven = self.announced = True
        self.failures = 0

    def _read_notes(self) -> None:
        for _ in range(1000):  # bounded: what is left waits for the next turn
            try:
                data, ancillary, _, _ = self.notes.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("reading a worker's notification failed: %s", exc)
                return
            pid = _sender(ancillary)
            w = self.workers.get(pid) if pid is not None else None
            states = data.split(b"\n")
            if w is not None and b"STOPPING=1" in states:
                w.accepting = False
            if w is None or b"READY=1" not in states:
                continue
            w.ready = True
            self.failures = 0
            if w.generation == self.generation:
                self.proven = True


def _sender(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if (
            level == socket.SOL_SOCKET
            and kind == socket.SCM_CREDENTIALS
            and len(data) >= _UCRED.size
        ):
            pid: int = _UCRED.unpack_from(data)[0]
            return pid
    return None
