"""Zero loss across handler restarts with the dispatcher in credit mode, for real: the real
``mongrel2``, ``chaussette-dispatcher --credit`` between it and two chaussette handlers
started with ``--m2-dispatcher``, steady load through Mongrel2, handlers restarted one at a
time (a new one started, then an old one sent SIGTERM) and both at once. A handler gets a
request only after it asked for one, and leaves with a goodbye the dispatcher answers, so
nothing is ever in flight to a handler that left: no request may fail.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from tests.conftest import Proc, free_port
from tests.load import Load
from tests.test_restarts_protocols import (  # noqa: F401 (fixtures)
    GRACEFUL,
    M2_APP,
    directory,
    is_pid,
    m2,
)


def wait_count(proc: Proc, text: str, count: int, timeout: float = 20) -> None:
    import time

    deadline = time.monotonic() + timeout
    while proc.output().count(text) < count:
        assert proc.popen.poll() is None, proc.output()[-4000:]
        assert time.monotonic() < deadline, f"{text!r} x{count}:\n{proc.output()[-4000:]}"
        time.sleep(0.05)


class Rig:
    def __init__(self, procs: Any, server: Any) -> None:
        self.procs = procs
        self.m2 = server
        self.credit = f"tcp://127.0.0.1:{free_port()}"
        self.dispatcher = procs.start(
            [
                sys.executable,
                "-m",
                "chaussette.devices.dispatcher",
                "--zeromq",
                server.tnet,
                "--credit",
                self.credit,
            ]
        )
        self.dispatcher.wait_for_output("credit mode")
        self.connected = 0
        self.handlers: list[Proc] = []

    def start_handler(self) -> Proc:
        proc = self.procs.chaussette(
            "--protocol",
            "mongrel2",
            "--zeromq",
            self.m2.tnet,
            "--m2-dispatcher",
            self.credit,
            "--threads",
            "4",
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


def test_credit_restarts_lose_nothing(m2, procs):  # noqa: F811 (the fixture)
    from tests.mongrel2 import wait_handler

    rig = Rig(procs, m2)
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
