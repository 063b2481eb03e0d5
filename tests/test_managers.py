"""Real Circus and real Supervisor running the SHIPPED example files.

examples/circus.ini and examples/supervisor.conf are read as they are; only the values an
operator is told to adapt are substituted (port, directories, the chaussette command, the
app). If a test needs anything more, the example is what must change.

Each manager is started in its own session; its workers are recorded as they are seen
(the managers put them in sessions or process groups of their own) and killed at teardown
if anything is left.
"""

from __future__ import annotations

import signal

from tests import managers
from tests.conftest import wait_http
from tests.managers import Circus, Events, Supervisor, pids_served, wait_gone

workers = managers.workers  # the fixture: worker pids killed at teardown

# -- Circus --


def test_circus_example(procs, short_tmp, tmp_path, workers):
    circus = Circus(procs, short_tmp, tmp_path, workers=workers)
    events = Events(circus.pubsub)
    try:
        wait_http(circus.tcp, circus.proc)
        wait_http(circus.unix, circus.proc)
        web, unix = circus.running("web", 2), circus.running("web_unix", 2)
        workers.update(web | unix)
        assert not web & unix
        # Two processes share each socket, and each of them answers.
        pids_served(circus.tcp, web, circus.proc)
        pids_served(circus.unix, unix, circus.proc)

        # Per watcher: Circus keeps the sockets open (a bare "restart" restarts circusd
        # itself and rebinds them).
        assert circus.ctl("restart", "web", "--waiting") == "ok"
        assert circus.ctl("restart", "web_unix", "--waiting") == "ok"
        new_web, new_unix = circus.running("web", 2), circus.running("web_unix", 2)
        workers.update(new_web | new_unix)
        assert not (new_web | new_unix) & (web | unix), "restart kept old workers"
        assert wait_gone(web | unix) == set(), "old workers still running after restart"
        pids_served(circus.tcp, new_web, circus.proc)
        # The old workers left Circus' socket file alone (they did not bind it).
        pids_served(circus.unix, new_unix, circus.proc)

        # Each old worker drained and exited 0 on Circus' SIGTERM (a SIGKILL after
        # graceful_timeout would be reported as -9).
        def all_reaped(seen: list[tuple[str, dict]]) -> bool:
            reaped = {e["process_pid"] for t, e in seen if t.endswith(".reap")}
            return reaped >= web | unix

        reaps = {
            e["process_pid"]: e["exit_code"]
            for topic, e in events.collect(all_reaped)
            if topic.endswith(".reap")
        }
        exits = {pid: reaps.get(pid) for pid in web | unix}
        assert exits == dict.fromkeys(web | unix, 0), f"exit codes {exits}\n{circus.proc.output()}"
    finally:
        events.close()

    assert circus.ctl("quit", "--waiting") == "ok"
    assert circus.proc.wait(60) == 0
    assert wait_gone(workers) == set(), f"workers left after quit\n{circus.proc.output()}"
    log = circus.proc.output()
    # circusd exits 0 even when it failed: its log says whether it did.
    for bad in ("[ERROR]", "[CRITICAL]", "Traceback"):
        assert bad not in log, log
    assert "web stopped" in log and "web_unix stopped" in log, log


def test_circusd_sigterm_stops_workers(procs, short_tmp, tmp_path, workers):
    circus = Circus(procs, short_tmp, tmp_path, workers=workers)
    wait_http(circus.tcp, circus.proc)
    wait_http(circus.unix, circus.proc)
    pids = circus.running("web", 2) | circus.running("web_unix", 2)
    workers.update(pids)
    circus.proc.send(signal.SIGTERM)
    assert circus.proc.wait(60) == 0
    assert wait_gone(pids) == set(), f"workers left after SIGTERM\n{circus.proc.output()}"
    log = circus.proc.output()
    for bad in ("[ERROR]", "[CRITICAL]", "Traceback"):
        assert bad not in log, log


# -- Supervisor --


def test_supervisor_example(procs, short_tmp, tmp_path, workers):
    sup = Supervisor(procs, short_tmp, tmp_path, workers=workers)
    first = sup.running()
    workers.update(first)
    wait_http(sup.tcp, sup.proc)
    # Both processes inherited the one socket as fd 0, and each of them answers.
    pids_served(sup.tcp, first, sup.proc)

    out = sup.ctl("restart", "web:*")
    assert "web:web_0: started" in out and "web:web_1: started" in out, out
    second = sup.running()
    workers.update(second)
    assert not second & first, "restart kept old workers"
    assert wait_gone(first) == set(), "old workers still running after restart"
    wait_http(sup.tcp, sup.proc)
    pids_served(sup.tcp, second, sup.proc)

    sup.ctl("shutdown")
    assert sup.proc.wait(60) == 0
    assert wait_gone(workers) == set(), f"workers left after shutdown\n{sup.log()}"
    log = sup.log_path.read_text()
    # Every stop (2 for the restart, 2 for the shutdown) was chaussette's clean exit on
    # SIGTERM, not a SIGKILL after stopwaitsecs.
    for name in ("web_0", "web_1"):
        assert log.count(f"stopped: {name} (exit status 0)") == 2, sup.log()
    for bad in (" ERRO ", "Traceback", "terminated by", "FATAL", "BACKOFF"):
        assert bad not in log, sup.log()
