"""What the protocol drivers need of a concurrency engine, and the OS-thread engine.

An engine gives: flags (set/clear/wait), locks, bounded task pools whose ``submit`` blocks
at the bound (the caller then stops reading: that is the backpressure), a way to run one
background task, an accept loop that can be stopped, and the main thread's cooperative
wait. ``ThreadEngine`` is stdlib only; the gevent and eventlet engines live beside their
servers so that their library is imported only when chosen.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import errno
import logging
import os
import queue
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

log = logging.getLogger("chaussette")

RETRY_ACCEPT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_MAX_TIMEVAL_US = (2**31 - 1) * 1_000_000  # a timeval's seconds fit in 32 bits everywhere


class Flag(Protocol):
    """A settable flag, as ``threading.Event``."""

    def set(self) -> None: ...
    def clear(self) -> None: ...
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class Pool(Protocol):
    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in a task of the pool; blocks while the pool is full."""

    def wait_available(self, timeout: float | None = None) -> bool:
        """Block until a task could be submitted without waiting; False on timeout."""

    def acquire(self) -> None:
        """Count a task the caller runs itself against the bound (waits at the bound)."""

    def release(self) -> None:
        """The end of a task counted by ``acquire``."""

    def active(self) -> int:
        """Tasks submitted (or acquired) and not finished, started or not yet."""

    def close(self) -> None:
        """Let idle workers go."""


class FdWatcher(Protocol):
    """Calls ``callback()`` once when ``fd`` becomes readable, unless unwatched first."""

    def watch(self, fd: int, callback: Callable[[], None], reuse: Any = None) -> Any:
        """Start watching; returns the token to give ``unwatch``. ``reuse``: a token this
        watcher returned for the same ``fd`` and the same connection before, now unwatched
        or fired (the engine may recycle it)."""

    def unwatch(self, token: Any) -> None: ...


class Acceptor(Protocol):
    def stop(self) -> None:
        """Accept no more connection; returns once the loop has ended."""


Handler = Callable[[Any, Any], None]  # (connection socket, peer address)


class Engine(abc.ABC):
    """A concurrency engine for the protocol drivers."""

    name: str
    multithread: bool  # wsgi.multithread
    cooperative: bool  # tasks switch only when they wait (greenlets)

    @abc.abstractmethod
    def flag(self) -> Flag: ...

    @abc.abstractmethod
    def lock(self) -> AbstractContextManager[Any]:
        """A mutex (for the writes of one connection)."""

    def core_lock(self) -> AbstractContextManager[Any]:
        """A mutex around a protocol core shared by several tasks: none is needed when
        tasks only switch while waiting for I/O."""
        return contextlib.nullcontext() if self.cooperative else self.lock()

    @abc.abstractmethod
    def pool(self, size: int, idle_timeout: float | None, name: str) -> Pool: ...

    @abc.abstractmethod
    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` in a background task of its own (never joined)."""

    @abc.abstractmethod
    def sleep(self, seconds: float) -> None: ...

    @abc.abstractmethod
    def start_acceptor(self, sock: socket.socket, pool: Pool, handle: Handler) -> Acceptor:
        """Accept connections on the listening ``sock`` while ``pool`` has room (at the
        bound, clients wait in the listen queue) and run ``handle(conn, addr)`` in it."""

    @abc.abstractmethod
    def wait_readable(self, fd: int, timeout: float | None) -> None:
        """The main thread's wait for the signal pipe."""

    def receiver(self, sock: Any) -> Callable[[int], bytes]:
        """The ``recv(size)`` a connection's reader uses: ``sock.recv`` unless the engine
        has a cheaper way to wait for bytes."""
        recv: Callable[[int], bytes] = sock.recv
        return recv

    def set_timeouts(self, sock: Any, timeout: float | None) -> bool:
        """Prepare an accepted connection; True when its reads and writes now fail after
        ``timeout`` seconds without progress by themselves. False: the socket waits
        without a timeout (no timer per wait: a greenlet library makes one each time it
        waits with one), and the server's watchdog enforces ``timeout`` instead."""
        sock.settimeout(None)
        return timeout is None

    def watcher(self) -> FdWatcher | None:
        """A watcher of descriptors, if this engine has one: with it, a connection's reader
        runs the connection's only request itself and hands the reading over to a new task
        (``spawn_reader``) only if bytes come meanwhile."""
        return None

    def spawn_reader(self, fn: Callable[[], None]) -> None:
        """Start a task that takes over reading a connection; never blocks (it may be
        called from the watcher)."""
        self.spawn(fn)


# -- OS threads --


class WorkerPool:
    """Worker threads made on demand, at most ``size``, kept while idle for
    ``idle_timeout`` seconds (None: kept for good): under steady load no thread is
    started. ``submit`` hands a task to an idle worker, or starts one, or waits for one
    to free at the bound.

    ``idle`` counts the workers waiting for a task that no ``submit`` has claimed yet;
    each claim is followed by exactly one task put on the queue, so a worker that wants to
    leave on its idle timeout must first take back an unclaimed place, or stay and take
    the task meant for it.
    """

    def __init__(self, size: int, idle_timeout: float | None, name: str) -> None:
        self.size = size
        self.idle_timeout = idle_timeout
        self.name = name
        self.cond = threading.Condition(threading.Lock())
        self.busy = 0  # tasks claimed or running
        self.idle = 0  # idle workers not claimed
        self.alive = 0
        self.closed = False
        self.queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self.cond:
            while self.busy >= self.size:
                self.cond.wait()
            self.busy += 1
            if self.idle:
                self.idle -= 1
                start = False
            else:
                self.alive += 1
                start = True
        if not start:
            self.queue.put((fn, args))
            return
        thread = threading.Thread(
            target=self._work, args=((fn, args),), name=self.name, daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # can't start new thread: run it here rather than drop it
            log.error("cannot start a %s thread; running the task in the caller", self.name)
            with self.cond:
                self.alive -= 1
            self._run(fn, args)
            self._release()

    def wait_available(self, timeout: float | None = None) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.busy < self.size, timeout)

    def acquire(self) -> None:
        """Count a task the caller runs itself against the bound (waits at the bound)."""
        with self.cond:
            while self.busy >= self.size:
                self.cond.wait()
            self.busy += 1

    def release(self) -> None:
        self._release()

    def active(self) -> int:
        return self.busy

    def close(self) -> None:
        with self.cond:
            self.closed = True
            count = self.idle
            self.idle = 0
            self.alive -= count
        for _ in range(count):
            self.queue.put(None)

    @staticmethod
    def _run(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("unexpected error in a worker thread")

    def _release(self) -> None:
        with self.cond:
            self.busy -= 1
            self.cond.notify()

    def _work(self, item: tuple[Callable[..., Any], tuple[Any, ...]] | None) -> None:
        get = self.queue.get
        while item is not None:
            self._run(*item)
            item = None  # drop references before waiting
            with self.cond:
                self.busy -= 1
                self.cond.notify()
                if self.closed:
                    self.alive -= 1
                    return
                self.idle += 1
            try:
                item = get(timeout=self.idle_timeout)
            except queue.Empty:
                with self.cond:
                    if self.idle:  # an unclaimed place is ours to take back: leave
                        self.idle -= 1
                        self.alive -= 1
                        return
                item = get()  # every place is claimed: a task is on its way


class _Watch:
    __slots__ = ("active", "armed", "callback", "fd", "since")

    def __init__(self, fd: int, callback: Callable[[], None], since: float) -> None:
        self.fd = fd
        self.callback = callback
        self.since = since
        self.active = True
        self.armed = False


class Watcher:
    """One thread watching, with epoll, the connections whose reader thread is busy running
    an app: when bytes (or the end) arrive on one, it calls back once (the connection then
    hands the reading to another thread).

    A syscall that releases the GIL is dear when many threads want it, so ``watch`` and
    ``unwatch`` make none: a watch is armed by the watcher thread only once it has lasted
    ``DELAY`` (most requests are over by then). The price: bytes that arrive during a
    request are noticed up to ``DELAY`` later. No lock: a watch's flags are each written by
    one side, and a late or stale callback is harmless (the connection's own flag, under its
    lock, decides whether a takeover is still wanted).
    """

    DELAY = 0.05
    ARMED = select.EPOLLIN | select.EPOLLONESHOT

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.pending: collections.deque[_Watch] = collections.deque()
        self.armed: dict[int, _Watch] = {}
        self.sleeping = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.epoll.register(self.wake_r, select.EPOLLIN)
        threading.Thread(target=self._loop, name="chaussette-watch", daemon=True).start()

    def watch(self, fd: int, callback: Callable[[], None], reuse: Any = None) -> _Watch:
        watch = _Watch(fd, callback, time.monotonic())
        self.pending.append(watch)
        if self.sleeping:
            self.sleeping = False
            try:
                os.write(self.wake_w, b"x")
            except BlockingIOError:
                pass
        return watch

    def unwatch(self, watch: _Watch) -> None:
        watch.active = False
        if watch.armed:
            self._disarm(watch.fd)

    def _disarm(self, fd: int) -> None:
        try:
            self.epoll.modify(fd, 0)
        except OSError:
            pass

    def _arm(self, watch: _Watch) -> None:
        watch.armed = True
        self.armed[watch.fd] = watch
        try:
            self.epoll.modify(watch.fd, self.ARMED)
        except FileNotFoundError:  # first time for this descriptor
            try:
                self.epoll.register(watch.fd, self.ARMED)
            except OSError:
                return  # closed meanwhile
        except OSError:
            return
        if not watch.active:  # unwatched while we armed it
            self._disarm(watch.fd)

    def _loop(self) -> None:
        pending = self.pending
        while True:
            timeout = self.DELAY if pending else None
            if timeout is None:
                self.sleeping = True
                if pending:
                    self.sleeping = False
                    continue
            try:
                events = self.epoll.poll(timeout)
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self.wake_r:
                    try:
                        while os.read(fd, 512):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                watch = self.armed.pop(fd, None)
                if watch is not None and watch.active:
                    watch.active = False
                    try:
                        watch.callback()
                    except Exception:
                        log.exception("unexpected error handing a connection over")
            now = time.monotonic()
            while pending and (not pending[0].active or pending[0].since + self.DELAY <= now):
                watch = pending.popleft()
                if watch.active:
                    self._arm(watch)


class GreenAcceptor:
    """The accept loop of a greenlet engine: one task on a cooperative copy of the listener,
    waiting for room in the pool before each accept. ``spawn`` starts the loop, ``sleep``
    yields; the engine gives its own socket copy and how to kill the task."""

    def __init__(
        self,
        sock: socket.socket,
        pool: Pool,
        handle: Handler,
        spawn: Callable[[Callable[[], None]], Any],
        sleep: Callable[[float], None],
    ) -> None:
        self.sock = sock
        self.pool = pool
        self.handle = handle
        self._sleep = sleep
        self.task = spawn(self._loop)

    def stop(self) -> None:
        self.task.kill()
        self.sock.close()

    def _loop(self) -> None:
        while True:
            self.pool.wait_available()
            conn = accept(self.sock, self._sleep)
            if conn is not None:
                self.pool.submit(self.handle, *conn)


class ThreadAcceptor:
    """A thread accepting on a non-blocking listener, woken by a pipe to stop."""

    def __init__(self, sock: socket.socket, pool: Pool, handle: Handler) -> None:
        self.sock = sock
        self.pool = pool
        self.handle = handle
        self.stopping = threading.Event()
        self.wake_r, self.wake_w = os.pipe()
        sock.setblocking(False)
        self.thread = threading.Thread(target=self._loop, name="chaussette-accept", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        os.write(self.wake_w, b"x")
        if self.thread is not threading.current_thread():
            self.thread.join()
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)

    def _loop(self) -> None:
        stopping = self.stopping
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self.wake_r, selectors.EVENT_READ)
            while not stopping.is_set():
                # a free place first: at the bound, clients wait in the kernel's queue
                while not self.pool.wait_available(0.5):
                    if stopping.is_set():
                        return
                conn = accept(self.sock)  # under load a connection is usually waiting
                while conn is None and not stopping.is_set():
                    if any(key.fileobj == self.wake_r for key, _ in sel.select()):
                        return
                    conn = accept(self.sock)
                if conn is not None:
                    self.pool.submit(self.handle, *conn)


def accept(sock: Any, sleep: Callable[[float], None] = time.sleep) -> tuple[Any, Any] | None:
    """One ``accept``; None when there was nothing (or an error worth only a log line).
    Out of descriptors or memory, it backs off 0.1 s with ``sleep`` (the engine's own)."""
    try:
        conn, addr = sock.accept()
    except BlockingIOError:
        return None  # nothing yet, or another process sharing the socket took it
    except OSError as exc:
        if exc.errno in RETRY_ACCEPT:
            log.error("accept failed: %s; retrying in 0.1 s", exc.strerror)
            sleep(0.1)
        elif exc.errno not in (errno.EAGAIN, errno.ECONNABORTED):
            log.error("accept failed: %s", exc)
        return None
    return conn, addr


class ThreadEngine(Engine):
    name = "threads"
    multithread = True
    cooperative = False

    def __init__(self) -> None:
        self._watcher: Watcher | None = None
        self._readers: WorkerPool | None = None

    def flag(self) -> Flag:
        return threading.Event()

    def lock(self) -> AbstractContextManager[Any]:
        return threading.Lock()

    def pool(self, size: int, idle_timeout: float | None, name: str) -> Pool:
        return WorkerPool(size, idle_timeout, name)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        threading.Thread(target=fn, args=args, name="chaussette-task", daemon=True).start()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def start_acceptor(self, sock: socket.socket, pool: Pool, handle: Handler) -> Acceptor:
        return ThreadAcceptor(sock, pool, handle)

    def set_timeouts(self, sock: Any, timeout: float | None) -> bool:
        """A blocking socket, with the kernel's SO_RCVTIMEO/SO_SNDTIMEO as the timeout:
        a Python socket timeout costs a poll() before each recv and send (two syscalls
        and two GIL handoffs where one does)."""
        sock.settimeout(None)
        if timeout is not None:
            micro = min(max(int(timeout * 1e6), 1), _MAX_TIMEVAL_US)  # 0 would mean "never"
            value = struct.pack("ll", micro // 1_000_000, micro % 1_000_000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        return True

    def wait_readable(self, fd: int, timeout: float | None) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            sel.select(timeout)

    def watcher(self) -> FdWatcher | None:
        if self._watcher is None:
            self._watcher = Watcher()
        return self._watcher

    def spawn_reader(self, fn: Callable[[], None]) -> None:
        if self._readers is None:
            self._readers = WorkerPool(1 << 20, 60.0, "chaussette-conn")
        self._readers.submit(fn)
