"""Zero dropped requests while real managers restart chaussette's HTTP workers (issue 6).

For every built-in HTTP backend the registry says can drain (websocket backends included:
they serve plain HTTP too), two worker processes serve one inherited TCP socket under a
real manager while tests/load.py keeps a steady load on ``/pid`` (some clients keep their
connection alive, some do not), and the workers are replaced several times:

- Circus (``$(circus.sockets.web)``): ``circusctl restart web --waiting`` (all stopped, then
  all started; the socket stays open meanwhile) and ``circusctl reload web --waiting`` (new
  processes first, then the old ones stopped);
- Supervisor (``[fcgi-program]``, ``--fd 0``): a rolling restart, one process at a time.

Every figure is printed (run with ``-s`` to see it); any failed request fails the test. The
answering pids must change: after the restarts only new workers answer. Each old worker must
have drained and exited 0 (not been SIGKILLed after the manager's stop timeout, which is
above chaussette's --graceful-timeout here as in the examples).

The last test pins down, without a manager, what lost requests here: a connection the
worker had accepted but whose request had not arrived yet when the drain began was closed
(the tornado and waitress backends did; eventlet's still does). Such a connection now gets
a moment to send its request (FRESH_GRACE), which is answered.
"""

from __future__ import annotations

import signal
import socket
import struct

import pytest

from chaussette.backends.registry import BACKENDS, BackendInfo, install_hint
from tests import managers
from tests.conftest import (
    ROUTES_APP,
    Conn,
    http_request,
    poll_until,
    request_bytes,
    require_module,
    wait_http,
)
from tests.load import Load, Report
from tests.managers import Circus, Supervisor, wait_answering, wait_gone

workers = managers.workers  # the fixture: worker pids killed at teardown

DRAINING = [b for b in BACKENDS if b.protocol == "http" and b.drain]
# chaussette drains within DRAIN seconds; the manager waits STOP before a SIGKILL.
DRAIN, STOP = 5, 10
RESTARTS = 2  # per test, each replacing both workers


def require(backend: BackendInfo) -> None:
    for module in backend.requires:
        require_module(module, install_hint(backend))


def options(backend: BackendInfo) -> str:
    return f"--backend {backend.name}"


def pid_body(body: bytes) -> bool:
    return body.isdigit()


def start_load(address: tuple[str, int]) -> Load:
    # 4 clients, 2 of them on keep-alive connections: steady, not flooding 2 cores.
    return Load(address, "/pid", clients=4, keepalive=2, expect=pid_body)


def check(report: Report, before: set[int], after: set[int], log: str) -> None:
    print(report.summary())
    answered = {int(body) for body in report.bodies}
    last = {int(body) for body in report.last_bodies.values()}
    print(f"pids before {sorted(before)}, after {sorted(after)}, answered {sorted(answered)}")
    assert report.failed == 0, f"{report.summary()}\n{log[-6000:]}"
    assert answered & before, f"the first workers never answered: {sorted(answered)}"
    assert last and last <= after, (
        f"after the restarts, answers came from {sorted(last)}, not only the new workers "
        f"{sorted(after)}"
    )


def drained(old: set[int], log: str) -> None:
    """Each old worker logged its clean end: drained, exit 0 (a SIGKILL after the
    manager's stop timeout, or requests cut by --graceful-timeout, would not say so)."""
    missing = sorted(pid for pid in old if f"[{pid}] [INFO] stopped (exit 0)" not in log)
    assert not missing, f"workers {missing} did not drain and exit 0\n{log[-6000:]}"


@pytest.mark.parametrize("command", ["restart", "reload"])
@pytest.mark.parametrize("backend", DRAINING, ids=lambda b: b.name)
def test_circus(procs, short_tmp, tmp_path, workers, backend, command):
    require(backend)
    circus = Circus(
        procs,
        short_tmp,
        tmp_path,
        options=options(backend),
        graceful=(DRAIN, STOP),
        unix=False,
        # Circus loses the last lines of a stopped process: each worker appends its own.
        worker_log=tmp_path / "workers.log",
        workers=workers,
    )
    first = circus.running("web", 2)
    for pid in first:
        wait_answering(circus.tcp, pid, circus.log)
    replaced: list[set[int]] = [first]

    def restarts() -> None:
        for _ in range(RESTARTS):
            replaced.append(getattr(circus, command)("web"))

    report = start_load(circus.tcp).run_while(restarts)
    check(report, first, replaced[-1], circus.log())
    old = set().union(*replaced[:-1])
    assert wait_gone(old) == set(), f"old workers still running\n{circus.log()}"
    drained(old, circus.log())


@pytest.mark.parametrize("backend", DRAINING, ids=lambda b: b.name)
def test_supervisor_rolling(procs, short_tmp, tmp_path, workers, backend):
    require(backend)
    sup = Supervisor(
        procs,
        short_tmp,
        tmp_path,
        options=options(backend),
        graceful=(DRAIN, STOP),
        startsecs=0,
        workers=workers,
    )
    first = sup.running()
    for pid in first:  # RUNNING at once (startsecs 0): serving is what counts
        wait_answering(sup.tcp, pid, sup.log)
    replaced: list[set[int]] = [first]

    def restarts() -> None:
        for _ in range(RESTARTS):
            replaced.append(sup.rolling_restart())

    report = start_load(sup.tcp).run_while(restarts)
    check(report, first, replaced[-1], sup.log())
    old = set().union(*replaced[:-1])
    assert wait_gone(old) == set(), f"old workers still running\n{sup.log()}"
    drained(old, sup.log())
    log = sup.log_path.read_text()
    for name in ("web_0", "web_1"):
        assert log.count(f"stopped: {name} (exit status 0)") == RESTARTS, sup.log()


# -- the cause of the requests lost in a restart, without a manager --


def accept_queue(listener: socket.socket) -> int:
    """Connections waiting in a listening TCP socket's accept queue (Linux reports it as
    tcpi_unacked in TCP_INFO for a listener)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    count: int = struct.unpack_from("I", info, 24)[0]
    return count


@pytest.mark.parametrize("backend", DRAINING, ids=lambda b: b.name)
def test_connection_accepted_before_a_stop_is_served(procs, backend):
    """A worker accepted a connection whose client has not sent its request yet when the
    drain begins: the request that comes next must be answered (by that worker, or by the
    next one if the connection was left in the queue), never cut. Under a manager this is
    what a restart under load does to a few connections; closing them fails requests no
    other worker can take over."""
    require(backend)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        address, fd = listener.getsockname(), listener.fileno()
        args = ("--backend", backend.name, "--fd", str(fd), "--graceful-timeout", "5")
        old = procs.chaussette(*args, ROUTES_APP, pass_fds=(fd,))
        wait_http(address, old)
        with Conn(address, timeout=15) as conn:
            # taken by the worker (or, where the library defers accepting until the request
            # comes, not queued for accept() yet): the socket's queue is empty
            poll_until(lambda: accept_queue(listener) == 0, "the connection accepted", old)
            old.send(signal.SIGTERM)
            old.wait_for_output("SIGTERM: stopping")
            new = procs.chaussette(*args, ROUTES_APP, pass_fds=(fd,))  # as a manager would
            conn.send(request_bytes("GET", "/pid"))
            response = conn.response()
        assert response.status == 200, f"{response.raw!r}\n{old.output()}"
        print(f"answered by {int(response.body)} (draining worker {old.pid}, new {new.pid})")
        assert old.wait(15) == 0, old.output()
        assert http_request(address, "/pid").body == str(new.pid).encode(), new.output()
        new.send(signal.SIGTERM)
        assert new.wait(15) == 0, new.output()
