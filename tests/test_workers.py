"""--workers N: a real master forking real workers on one shared socket.

Which worker answers is made deterministic, not left to the kernel: each worker serves one
request at a time (--threads 1 / --spawn 1), and a request held open on one worker (the
``/hold`` route below, released by a gate file) keeps it busy, so the next request is
answered by another one. /proc/PID/task/PID/children gives the master's live workers.

Under load (tests/load.py, issue 6): a SIGKILLed worker, SIGTERM, SIGTTIN/SIGTTOU and SIGHUP
while clients keep sending. There every client's request can be held in the app at once
(the ``/gated`` route, a gate file again), so what each worker was serving at the moment of
a signal is known, not guessed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ROUTES_APP,
    Proc,
    connect,
    free_port,
    http_request,
    parse_response,
    poll_until,
    read_all,
    wait_http,
)
from tests.load import Load

HOLD_APP = '''\
"""/hold?gate=PATH: the pid at once, then "done" when PATH exists. Anything else: the pid."""
import os
import time
from urllib.parse import parse_qs


def application(environ, start_response):
    pid = str(os.getpid()).encode()
    if environ["PATH_INFO"] == "/hold":
        gate = parse_qs(environ["QUERY_STRING"])["gate"][0]
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield pid + b"\\n"
            for _ in range(400):  # 20 s at most
                if os.path.exists(gate):
                    break
                time.sleep(0.05)
            yield b"done"

        return body()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(pid)))])
    return [pid]
'''

# the first piece of the /hold body, chunked or not
FIRST_PIECE = re.compile(rb"\r\n\r\n(?:[0-9a-fA-F]+\r\n)?(\d+)\n")
CRASH_APP = "import os\nos._exit(1)\n"

# one request at a time per worker, so that a held request makes its worker busy
BACKENDS = {
    "wsgiref": ("--backend", "wsgiref", "--threads", "1"),
    "gevent": ("--backend", "gevent", "--spawn", "1"),
}


def wait_until(what: str, condition: Callable[[], object], timeout: float = 15) -> None:
    poll_until(condition, what, timeout=timeout)


def wait_serving(proc: Proc, count: int, timeout: float = 20) -> None:
    """Until ``count`` processes logged that they serve (a master forks the second worker
    once the first serves)."""
    deadline = time.monotonic() + timeout
    while proc.output().count("): serving ") < count:
        assert time.monotonic() < deadline, proc.output()
        assert proc.popen.poll() is None, proc.output()
        time.sleep(0.05)


def workers_of(proc: Proc) -> set[int]:
    """The master's live children."""
    try:
        text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(p) for p in text.split()}


def get_pid(address: tuple[str, int] | str) -> int:
    resp = http_request(address, "/pid")
    assert resp.status == 200, resp.raw
    return int(resp.body)


class Held:
    """A /hold request in progress: its worker's pid is known, its end waits for the gate."""

    def __init__(self, address: tuple[str, int] | str, gate: Path) -> None:
        self.gate = gate
        self.sock = connect(address)
        self.sock.sendall(
            f"GET /hold?gate={gate} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        for _ in range(100):
            found = FIRST_PIECE.search(data)
            if found:
                break
            more = self.sock.recv(65536)
            assert more, data
            data += more
        assert found, data
        self.head = data
        self.pid = int(found.group(1))

    def finish(self) -> bytes:
        self.gate.write_text("open")
        raw = self.head + read_all(self.sock)
        self.sock.close()
        resp = parse_response(raw)
        assert resp.status == 200, raw
        pid, _, rest = resp.body.partition(b"\n")
        assert int(pid) == self.pid, raw
        return rest

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hold_app(tmp_path: Path) -> str:
    path = tmp_path / "hold_app.py"
    path.write_text(HOLD_APP)
    return f"{path}:application"


@contextlib.contextmanager
def holding(address: tuple[str, int] | str, gate: Path) -> Iterator[Held]:
    held = Held(address, gate)
    try:
        yield held
    finally:
        gate.write_text("open")
        held.close()


def start(procs, *args: str, address: tuple[str, int] | None = None) -> tuple[Proc, tuple]:
    address = address or ("127.0.0.1", free_port())
    proc = procs.chaussette("--port", str(address[1]), "--graceful-timeout", "10", *args)
    wait_http(address, proc, "/pid")
    return proc, address


def assert_stops_cleanly(
    proc: Proc, signum: int | None = signal.SIGTERM, tracebacks: int | None = 0
) -> str:
    """Stop with ``signum`` (None: it was sent already; a second one could arrive after
    the handlers are restored, and kill) and check the exit."""
    if signum is None:
        proc.wait(30)
    code = proc.stop(signum or signal.SIGTERM)
    output = proc.output()
    assert code == 0, output
    assert "stopped (exit 0)" in output, output
    if tracebacks is not None:
        assert output.count("Traceback") == tracebacks, output
    return output


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_workers_answer_and_stop_gracefully(procs, hold_app, tmp_path, backend) -> None:
    proc, address = start(procs, *BACKENDS[backend], "--workers", "2", hold_app)
    wait_until("2 workers", lambda: len(workers_of(proc)) == 2)
    children = workers_of(proc)
    with holding(address, tmp_path / "gate") as held:
        assert held.pid in children
        other = get_pid(address)  # the held worker is busy: the other one answers
        assert other in children and other != held.pid
        # SIGTERM while a request is in flight: it completes, then everyone exits 0
        proc.send(signal.SIGTERM)
        proc.wait_for_output("SIGTERM: stopping 2 worker(s)")
        assert held.finish() == b"done"
    output = assert_stops_cleanly(proc, None)
    for pid in children:
        assert f"worker {pid} started" in output
        assert f"worker {pid} exited (exit 0)" in output


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_killed_worker_is_replaced_and_others_unaffected(
    procs, hold_app, tmp_path, backend
) -> None:
    proc, address = start(procs, *BACKENDS[backend], "--workers", "2", hold_app)
    wait_until("2 workers", lambda: len(workers_of(proc)) == 2)
    with holding(address, tmp_path / "gate") as held:
        victim = get_pid(address)
        assert victim != held.pid
        os.kill(victim, signal.SIGKILL)
        proc.wait_for_output(f"worker {victim} exited (killed by SIGKILL); starting another")
        wait_until("a new worker", lambda: len(workers_of(proc) - {held.pid, victim}) == 1)
        (new,) = workers_of(proc) - {held.pid, victim}
        # the held worker is still busy: only the new one can answer
        assert wait_http(address, proc, "/pid").body == str(new).encode()
        assert held.finish() == b"done"
    assert_stops_cleanly(proc)


def test_sighup_replaces_workers_and_old_ones_drain(procs, hold_app, tmp_path) -> None:
    proc, address = start(procs, *BACKENDS["wsgiref"], "--workers", "2", hold_app)
    wait_until("2 workers", lambda: len(workers_of(proc)) == 2)
    old = workers_of(proc)
    with holding(address, tmp_path / "gate") as held:
        proc.send(signal.SIGHUP)
        proc.wait_for_output("2 new worker(s) serving; 2 old one(s) draining")
        (idle,) = old - {held.pid}
        proc.wait_for_output(f"worker {idle} exited (exit 0)")
        for _ in range(5):
            assert get_pid(address) not in old
        assert held.pid in workers_of(proc)  # still draining its request
        assert held.finish() == b"done"
        proc.wait_for_output(f"worker {held.pid} exited (exit 0)")
    wait_until("2 new workers", lambda: len(workers_of(proc)) == 2)
    assert not workers_of(proc) & old
    assert_stops_cleanly(proc)


def test_ttin_ttou_add_and_remove_a_worker_on_a_unix_socket(procs, hold_app, short_tmp) -> None:
    path = str(short_tmp / "w.sock")
    proc = procs.chaussette(
        "--host", f"unix:{path}", *BACKENDS["wsgiref"], "--workers", "1", hold_app
    )
    wait_http(path, proc, "/pid")
    wait_until("1 worker", lambda: len(workers_of(proc)) == 1)
    (first,) = workers_of(proc)
    proc.send(signal.SIGTTIN)
    proc.wait_for_output("SIGTTIN: 2 worker(s)")
    wait_until("2 workers", lambda: len(workers_of(proc)) == 2)
    (second,) = workers_of(proc) - {first}
    with holding(path, short_tmp / "gate") as held:  # both serve the same socket
        assert {held.pid, get_pid(path)} == {first, second}
    proc.send(signal.SIGTTOU)
    proc.wait_for_output("SIGTTOU: 1 worker(s)")
    wait_until("1 worker", lambda: len(workers_of(proc)) == 1)
    (left,) = workers_of(proc)
    gone = ({first, second} - {left}).pop()
    proc.wait_for_output(f"worker {gone} exited (exit 0)")
    # a worker that stops leaves the master's socket file alone
    assert os.path.exists(path)
    assert get_pid(path) == left
    assert_stops_cleanly(proc)
    assert not os.path.exists(path)


def test_app_that_cannot_load_stops_the_master_without_a_fork_loop(procs) -> None:
    proc = procs.chaussette(
        "--port", str(free_port()), "--workers", "4", "tests.apps.no_such_module:app"
    )
    code = proc.wait(30)
    output = proc.output()
    assert code == 3, output
    assert output.count(" started") == 1, output  # one worker tried, not four, not a loop
    errors = [line for line in output.splitlines() if line.startswith("chaussette: error:")]
    assert len(errors) == 1 and "no_such_module" in errors[0], output
    assert "could not load the application (exit 3): stopping" in output, output
    assert "Traceback" not in output, output


def test_workers_dying_before_serving_are_retried_then_given_up(procs, tmp_path) -> None:
    app = tmp_path / "crash_app.py"
    app.write_text(CRASH_APP)
    proc = procs.chaussette("--port", str(free_port()), "--workers", "2", f"{app}:application")
    code = proc.wait(30)
    output = proc.output()
    assert code == 1, output
    assert output.count("exited before serving (exit 1); 0 serving; retrying") == 4, output
    assert "5 workers in a row exited before serving: stopping" in output, output


def test_sigint_stops_like_sigterm(procs) -> None:
    proc, address = start(procs, "--workers", "2", ROUTES_APP)
    wait_until("2 workers", lambda: len(workers_of(proc)) == 2)
    output = assert_stops_cleanly(proc, signal.SIGINT)
    assert "SIGINT: stopping 2 worker(s)" in output
    with pytest.raises(OSError):
        connect(address, timeout=2).close()


def test_workers_and_reloader_are_refused(procs) -> None:
    proc = procs.chaussette("--workers", "2", "--use-reloader", ROUTES_APP)
    assert proc.wait(30) == 2
    assert "--workers and --use-reloader cannot be used together" in proc.output()


def test_worker_ignores_sighup_and_master_replaces_a_stopped_one(procs) -> None:
    proc, address = start(procs, "--workers", "1", ROUTES_APP)
    wait_until("1 worker", lambda: len(workers_of(proc)) == 1)
    (worker,) = workers_of(proc)
    os.kill(worker, signal.SIGHUP)  # only the master replaces workers
    assert get_pid(address) == worker
    os.kill(worker, signal.SIGTERM)  # stopped from outside: it drains, then is replaced
    proc.wait_for_output(f"worker {worker} exited (exit 0); starting another")
    wait_until("a new worker", lambda: len(workers_of(proc) - {worker}) == 1)
    assert wait_http(address, proc, "/pid").body != str(worker).encode()
    assert_stops_cleanly(proc)


def test_sighup_with_a_broken_app_keeps_the_old_workers(procs, tmp_path) -> None:
    app = tmp_path / "changing_app.py"
    app.write_text(HOLD_APP)
    proc, address = start(procs, "--workers", "2", f"{app}:application")
    wait_until("2 workers serving", lambda: proc.output().count("): serving ") == 2)
    old = workers_of(proc)
    app.write_text("raise RuntimeError('broken by the deploy')\n")
    proc.send(signal.SIGHUP)
    proc.wait_for_output("could not load the application (exit 3); keeping the previous workers")
    output = proc.output()
    assert output.count("RuntimeError: broken by the deploy") == 1, output  # one try, no loop
    assert workers_of(proc) == old
    assert get_pid(address) in old
    # an old worker dies: its replacement cannot load the app either; the other one serves on
    victim, survivor = sorted(old)
    os.kill(victim, signal.SIGKILL)
    proc.wait_for_output("could not load the application (exit 3); 1 serving; retrying in")
    assert get_pid(address) == survivor
    output = assert_stops_cleanly(proc, tracebacks=None)
    # retries wait, longer each time: no fork loop
    assert 2 <= output.count("RuntimeError: broken by the deploy") < 6, output


# -- under load (issue 6) --

GATED_APP = '''\
"""/gated?gate=G&dir=D: the pid; while G does not exist, the request waits (a file in D
says so). Anything else: the pid."""
import os
import threading
import time
from urllib.parse import parse_qs


def application(environ, start_response):
    if environ["PATH_INFO"] == "/gated":
        query = {k: v[-1] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
        if not os.path.exists(query["gate"]):
            waiting = os.path.join(query["dir"], f"{os.getpid()}-{threading.get_ident()}")
            with open(waiting, "w"):
                pass
            for _ in range(1000):  # 20 s at most
                if os.path.exists(query["gate"]):
                    break
                time.sleep(0.02)
            os.unlink(waiting)
    pid = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(pid)))])
    return [pid]
'''


def peer_ports(pid: int, port: int) -> set[int]:
    """The client ports of the TCP connections to ``port`` that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(local.split(":")[1], 16) == port and remote != "00000000:0000":
            ports.add(int(remote.split(":")[1], 16))
    return ports


def is_pid(body: bytes) -> bool:
    return body.isdigit()


# as many requests at once as the load has clients
LOAD_BACKENDS = {"wsgiref": ("--backend", "wsgiref"), "gevent": ("--backend", "gevent")}


class Gate:
    """Closed, the gated route's requests wait in the app, each with a file in ``dir``."""

    def __init__(self, tmp: Path) -> None:
        self.path, self.dir = tmp / "gate", tmp / "waiting"
        self.dir.mkdir()
        self.path.write_text("open")

    @property
    def route(self) -> str:
        return f"/gated?gate={self.path}&dir={self.dir}"

    def close(self) -> None:
        self.path.unlink()

    def open(self) -> None:
        self.path.write_text("open")

    def waiting(self) -> list[int]:
        """The pids of the requests waiting (one entry each)."""
        return [int(name.split("-")[0]) for name in os.listdir(self.dir)]


@pytest.fixture
def gated_app(tmp_path: Path) -> str:
    path = tmp_path / "gated_app.py"
    path.write_text(GATED_APP)
    return f"{path}:application"


@pytest.mark.parametrize("backend", list(LOAD_BACKENDS))
def test_worker_sigkilled_under_load(procs, gated_app, tmp_path, backend) -> None:
    """Every client's request is held in the app, across the workers; one worker is
    killed. Only requests on connections it held may fail (their client ports are read from
    /proc before the kill), and each of those is seen cut; the others complete."""
    proc, address = start(procs, *LOAD_BACKENDS[backend], "--workers", "3", gated_app)
    wait_serving(proc, 3)
    gate = Gate(tmp_path)
    clients = 6
    load = Load(address, gate.route, clients=clients, expect=is_pid)
    state: dict[str, Any] = {}

    def kill_one() -> None:
        gate.close()
        wait_until("every client waits", lambda: len(gate.waiting()) == clients)
        waiting = gate.waiting()
        state["victim"] = victim = max(set(waiting), key=waiting.count)
        state["in flight"] = waiting.count(victim)
        state["held"] = peer_ports(victim, address[1])
        state["before"] = workers_of(proc)
        state["retried"] = load.report.retried
        os.kill(victim, signal.SIGKILL)
        proc.wait_for_output(f"worker {victim} exited (killed by SIGKILL); starting another")
        wait_serving(proc, 4)
        # the killed worker's clients sent again, to the others: still waiting at the gate
        # (the files of the killed worker's requests stay: it had no time to remove them)
        again = lambda: len([p for p in gate.waiting() if p != victim]) == clients  # noqa: E731
        wait_until("its clients wait again", again)
        state["failed at kill"] = load.report.failed
        gate.open()

    report = load.run_while(kill_one, before=60, after=150)
    print(backend, report.summary(), state)
    held = state["held"]
    assert len(held) == state["in flight"] >= 1, state
    assert {f.port for f in report.failures} <= held, (held, report.summary())
    # each request it held was cut: a failure, or a resend on a reused keep-alive connection
    cut = state["failed at kill"] + load.report.retried - state["retried"]
    assert report.failed == state["failed at kill"] and cut == len(held), (state, report.summary())
    live = workers_of(proc)
    assert state["victim"] not in live and len(live) == 3, live
    (new,) = live - state["before"]
    assert report.bodies[str(new).encode()], report.bodies  # the replacement serves
    assert {int(body) for body in report.last_bodies.values()} <= live, report.last_bodies
    assert_stops_cleanly(proc)


@pytest.mark.parametrize("backend", list(LOAD_BACKENDS))
def test_sigterm_drains_every_worker_under_load(procs, gated_app, tmp_path, backend) -> None:
    """SIGTERM while every client has a request held in the app, across the workers: the
    clients start no new request, and every held one is answered in full."""
    proc, address = start(procs, *LOAD_BACKENDS[backend], "--workers", "3", gated_app)
    wait_serving(proc, 3)
    gate = Gate(tmp_path)
    clients = 6
    load = Load(address, gate.route, clients=clients, expect=is_pid)
    load.start()
    try:
        load.wait_answers(60)
        gate.close()
        wait_until("every client waits", lambda: len(gate.waiting()) == clients)
        in_flight = gate.waiting()
        answered = load.report.ok
        load.halt()
        proc.send(signal.SIGTERM)
        proc.wait_for_output("SIGTERM: stopping 3 worker(s)")
        wait_until("3 workers drain", lambda: proc.output().count("SIGTERM: stopping (") == 3)
        assert len(gate.waiting()) == clients  # still held: only the gate lets them go
        gate.open()
    finally:
        report = load.stop()
    print(backend, report.summary(), "held on", sorted(set(in_flight)))
    assert report.failed == 0, report.summary()
    assert report.ok - answered == clients, report.summary()  # every held one, in full
    output = assert_stops_cleanly(proc, None)
    for pid in set(in_flight):
        assert f"worker {pid} exited (exit 0)" in output, output


@pytest.mark.parametrize("backend", list(LOAD_BACKENDS))
def test_ttin_ttou_under_load(procs, gated_app, tmp_path, backend) -> None:
    """SIGTTIN adds a worker that takes a share of the load; SIGTTOU retires it while it
    holds requests in the app: they are answered (it drains), nothing fails."""
    proc, address = start(procs, *LOAD_BACKENDS[backend], "--workers", "2", gated_app)
    wait_serving(proc, 2)
    gate = Gate(tmp_path)
    clients = 4
    load = Load(address, gate.route, clients=clients, expect=is_pid)
    state: dict[str, Any] = {}

    def more_then_fewer() -> None:
        before = workers_of(proc)
        proc.send(signal.SIGTTIN)
        wait_serving(proc, 3)
        (added,) = workers_of(proc) - before
        for _ in range(20):  # until the added worker holds some of the waiting requests
            gate.close()
            wait_until("every client waits", lambda: len(gate.waiting()) == clients)
            if added in gate.waiting():
                break
            gate.open()
            load.wait_answers(10)
        else:
            raise AssertionError(f"worker {added} never got a request:\n{proc.output()}")
        state["held on the retired one"] = gate.waiting().count(added)
        proc.send(signal.SIGTTOU)  # the youngest worker goes: the one added
        proc.wait_for_output("SIGTTOU: 2 worker(s)")
        proc.wait_for_output(f"[{added}] [INFO] SIGTERM: stopping")
        assert added in workers_of(proc)  # draining its held requests
        gate.open()
        wait_until("one worker retired", lambda: len(workers_of(proc)) == 2)
        (state["retired"],) = (before | {added}) - workers_of(proc)
        state["added"] = added

    report = load.run_while(more_then_fewer, before=60, after=150)
    print(backend, report.summary(), state)
    assert report.failed == 0, report.summary()
    assert state["retired"] == state["added"], state
    output = proc.output()
    assert f"worker {state['retired']} exited (exit 0)" in output, output
    live = workers_of(proc)
    assert {int(body) for body in report.last_bodies.values()} <= live, (report.last_bodies, live)
    assert_stops_cleanly(proc)


VERSIONED_APP = """\
VERSION = {version!r}


def application(environ, start_response):
    body = VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.mark.parametrize("backend", list(LOAD_BACKENDS))
def test_sighup_replaces_workers_under_load(procs, tmp_path, backend) -> None:
    """The app is edited, SIGHUP: a new generation serves, the old one drains; no request
    fails and every client gets the new code afterwards."""
    app = tmp_path / "versioned_app.py"
    app.write_text(VERSIONED_APP.format(version="v1"))
    proc, address = start(procs, *LOAD_BACKENDS[backend], "--workers", "2", f"{app}:application")
    wait_serving(proc, 2)
    old = workers_of(proc)

    def reload() -> None:
        app.write_text(VERSIONED_APP.format(version="v2."))
        proc.send(signal.SIGHUP)
        proc.wait_for_output("2 new worker(s) serving; 2 old one(s) draining")
        for pid in old:
            proc.wait_for_output(f"worker {pid} exited (exit 0)")

    load = Load(address, clients=4, expect=lambda body: body in (b"v1", b"v2."))
    report = load.run_while(reload, before=60, after=150)
    print(backend, report.summary())
    assert report.failed == 0, report.summary()
    assert report.bodies[b"v1"] and report.bodies[b"v2."], report.bodies
    assert set(report.last_bodies.values()) == {b"v2."}, report.last_bodies
    assert not workers_of(proc) & old
    assert_stops_cleanly(proc)
