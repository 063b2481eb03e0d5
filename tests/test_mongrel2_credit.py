"""Zero loss across handler restarts with the dispatcher in credit mode, for real: the real
``mongrel2``, ``chaussette-dispatcher --credit`` between it and two chaussette handlers
started with ``--m2-dispatcher``, steady load through Mongrel2, handlers restarted one at a
time (a new one started, then an old one sent SIGTERM) and both at once, on every engine.
A handler gets a request only after it asked for one, and leaves with a goodbye the
dispatcher answers, so nothing is ever in flight to a handler that left: no request may
fail. And a dispatcher that restarts gets the handlers' credit again, without them
restarting.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import pytest

from tests.apps.gateway_app import FIRST, SECOND
from tests.conftest import Conn, Proc, free_port, request_bytes
from tests.load import Load
from tests.test_restarts_protocols import (  # noqa: F401 (fixtures)
    ENGINES,
    GRACEFUL,
    M2_APP,
    directory,
    is_pid,
    m2,
)


def wait_count(proc: Proc, text: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while proc.output().count(text) < count:
        assert proc.popen.poll() is None, proc.output()[-4000:]
        assert time.monotonic() < deadline, f"{text!r} x{count}:\n{proc.output()[-4000:]}"
        time.sleep(0.05)


class Rig:
    def __init__(self, procs: Any, server: Any, engine: str = "threads") -> None:
        self.procs = procs
        self.m2 = server
        self.engine = engine
        self.credit = f"tcp://127.0.0.1:{free_port()}"
        self.connected = 0
        self.dispatcher = self.start_dispatcher()
        self.handlers: list[Proc] = []

    def start_dispatcher(self) -> Proc:
        argv = [sys.executable, "-m", "chaussette.devices.dispatcher", "--zeromq", self.m2.tnet]
        proc = self.procs.start([*argv, "--credit", self.credit])
        proc.wait_for_output("credit mode")
        return proc

    def start_handler(self, size: int = 4) -> Proc:
        proc = self.procs.chaussette(
            "--protocol",
            "mongrel2",
            "--zeromq",
            self.m2.tnet,
            "--m2-dispatcher",
            self.credit,
            "--backend",
            self.engine,
            "--threads" if self.engine == "threads" else "--spawn",
            str(size),
            "--graceful-timeout",
            str(GRACEFUL),
            M2_APP,
            cwd=self.m2.workdir,
        )
        self.connected += 1
        # ready: its credit reached the dispatcher
        wait_count(self.dispatcher, "connected", self.connected)
        self.handlers.append(proc)
        return proc

    def stop_handler(self, proc: Proc) -> None:
        proc.send(signal.SIGTERM)
        code = proc.wait(GRACEFUL + 10)
        out = proc.output()
        assert code == 0, out
        assert "leaving the dispatcher" in out and "disconnected from the dispatcher" in out, out
        assert "Traceback" not in out, out
        self.handlers.remove(proc)

    def one_at_a_time(self, times: int) -> None:
        for _ in range(times):
            old = self.handlers[0]
            self.start_handler()
            self.stop_handler(old)

    def both_at_once(self) -> None:
        old = list(self.handlers)
        for proc in old:
            proc.send(signal.SIGTERM)
        for _ in old:
            self.start_handler()
        for proc in old:
            self.stop_handler(proc)


@pytest.mark.parametrize("engine", ENGINES)
def test_credit_restarts_lose_nothing(engine, m2, procs):  # noqa: F811 (the fixture)
    from tests.mongrel2 import wait_handler

    rig = Rig(procs, m2, engine)
    rig.start_handler()
    rig.start_handler()
    wait_handler(m2, rig.dispatcher)
    for what, action in (
        ("one at a time, x4", lambda: rig.one_at_a_time(4)),
        ("both at once, x2", lambda: (rig.both_at_once(), rig.both_at_once())),
    ):
        load = Load(m2.address, "/app/pid", clients=4, expect=is_pid, timeout=5)
        report = load.run_while(action)
        print(f"--- {what}\n{report.summary()}")
        assert report.failed == 0, f"{report.summary()}\n{rig.dispatcher.output()[-3000:]}"
        assert report.ok > 0
    # the new handlers answer
    pids = {str(p.pid).encode() for p in rig.handlers}
    assert set(report.last_bodies.values()) <= pids, (report.last_bodies, pids)
    rig.dispatcher.send(signal.SIGTERM)
    assert rig.dispatcher.wait(15) == 0
    out = rig.dispatcher.output()
    assert "Traceback" not in out and "one dropped" not in out and "0 dropped" in out, out


@pytest.mark.parametrize("engine", ENGINES)
def test_handlers_ask_a_restarted_dispatcher_again(engine, m2, procs):  # noqa: F811
    """The dispatcher restarts (SIGTERM, then a new one on the same endpoint) while the
    handlers keep running: ZeroMQ connects them again, they give the new dispatcher their
    credit, and both serve again without a restart of their own."""
    from tests.mongrel2 import wait_handler

    rig = Rig(procs, m2, engine)
    first, second = rig.start_handler(), rig.start_handler()
    wait_handler(m2, rig.dispatcher)
    rig.dispatcher.send(signal.SIGTERM)
    assert rig.dispatcher.wait(15) == 0, rig.dispatcher.output()
    for proc in (first, second):
        proc.wait_for_output("lost the dispatcher")
    rig.dispatcher = rig.start_dispatcher()
    wait_count(rig.dispatcher, "connected", 2)
    for proc in (first, second):
        proc.wait_for_output("connected to the dispatcher again")
    load = Load(m2.address, "/app/pid", clients=4, expect=is_pid, timeout=5)
    report = load.run_while(lambda: time.sleep(1.0))
    print(report.summary())
    assert report.failed == 0 and report.ok > 0, report.summary()
    pids = {str(p.pid).encode() for p in (first, second)}
    assert set(report.bodies) == pids, (set(report.bodies), pids)
    for proc in (first, second):
        assert "Traceback" not in proc.output(), proc.output()


def test_stopping_dispatcher_hands_out_its_queue(m2, procs):  # noqa: F811
    """SIGTERM to a dispatcher with requests waiting in its queue (its only handler's one
    task is held by a request): it leaves Mongrel2 but stays until the handler has asked
    for them all, and the handler serves them."""
    from tests.mongrel2 import wait_handler

    rig = Rig(procs, m2)
    rig.start_handler(size=1)
    wait_handler(m2, rig.dispatcher)
    gate = m2.workdir / "gate"
    conns = [Conn(m2.address, timeout=20) for _ in range(6)]
    try:
        for conn in conns:
            conn.send(request_bytes("GET", f"/app/gate?path={gate}"))
            if conn is conns[0]:
                conn.read_until(b"first piece")  # holds the only task
        time.sleep(0.5)  # the others reach the dispatcher's queue
        rig.dispatcher.send(signal.SIGTERM)
        time.sleep(0.5)
        assert rig.dispatcher.popen.poll() is None, rig.dispatcher.output()
        gate.write_text("open")
        for conn in conns[1:]:
            assert conn.response().body == FIRST + SECOND
    finally:
        for conn in conns:
            conn.sock.close()
    assert rig.dispatcher.wait(15) == 0, rig.dispatcher.output()
    out = rig.dispatcher.output()
    assert "0 queued, 0 dropped" in out and "Traceback" not in out, out
