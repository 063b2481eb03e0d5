"""Logging of real chaussette processes: format, startup lines, level, output file, config
files, access log."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import pytest

from tests.conftest import ROUTES_APP, Proc, free_port, http_request, wait_http

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} \[(\d+)\] \[([A-Z]+)\] (.*)$")
ACCESS_LINE = re.compile(
    r'^(\S+) - - \[[^\]]+\] "([A-Z]+) (\S+) HTTP/1\.[01]" (\d{3}) (\d+|-) "[^"]*" "[^"]*" '
    r"\d+\.\d+$"
)


def classic(text: str) -> list[tuple[int, str, str]]:
    """(pid, level, message) of every line in the classic format."""
    return [(int(m[1]), m[2], m[3]) for line in text.splitlines() if (m := LINE.match(line))]


def stop(proc: Proc) -> int:
    proc.send(signal.SIGTERM)
    return proc.wait(15)


def start(procs, *args: str) -> tuple[Proc, tuple[str, int]]:
    port = free_port()
    proc = procs.chaussette("--port", str(port), *args)
    address = ("127.0.0.1", port)
    wait_http(address, proc)
    return proc, address


def test_classic_format_and_startup_line(procs):
    proc, (_, port) = start(procs, ROUTES_APP)
    assert stop(proc) == 0
    lines = classic(proc.output())
    assert lines, proc.output()
    assert {pid for pid, _, _ in lines} == {proc.pid}
    startup = [msg for _, level, msg in lines if level == "INFO" and "serving" in msg]
    assert len(startup) == 1, lines
    assert f"serving {ROUTES_APP} on http://127.0.0.1:{port} (fd 3, bound)" in startup[0]
    assert "with backend wsgiref" in startup[0]
    assert f"(pid {proc.pid})" in startup[0]
    assert lines[-1] == (proc.pid, "INFO", "stopped (exit 0)")


def test_startup_line_names_unix_socket(procs, short_tmp):
    path = short_tmp / "log.sock"
    proc = procs.chaussette("--host", f"unix:{path}", ROUTES_APP)
    wait_http(str(path), proc)
    assert stop(proc) == 0
    startup = [msg for _, _, msg in classic(proc.output()) if "serving" in msg]
    assert len(startup) == 1
    assert f"serving {ROUTES_APP} on unix:{path} (fd 3, bound) with backend wsgiref" in startup[0]


def test_startup_line_names_inherited_fd(procs):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        host, port = listener.getsockname()
        fd = listener.fileno()
        proc = procs.chaussette("--fd", str(fd), pass_fds=(fd,))
        wait_http((host, port), proc)
        assert stop(proc) == 0
    startup = [msg for _, _, msg in classic(proc.output()) if "serving" in msg]
    assert len(startup) == 1
    where = f"http://127.0.0.1:{port} (fd {fd}, from --fd {fd})"
    assert f"serving chaussette.hello:app on {where}" in startup[0]


def test_log_level_warning_hides_info(procs):
    proc, address = start(procs, "--log-level", "warning", ROUTES_APP)
    assert http_request(address, "/error").status == 500
    assert stop(proc) == 0
    out = proc.output()
    levels = {level for _, level, _ in classic(out)}
    assert levels == {"ERROR"}, out
    assert "RuntimeError: boom before start_response" in out  # the traceback is logged


def test_log_output_file(procs, tmp_path):
    log_file = tmp_path / "chaussette.log"
    proc, address = start(procs, "--log-output", str(log_file), ROUTES_APP)
    assert http_request(address, "/").status == 200
    assert stop(proc) == 0
    assert proc.output() == ""
    lines = classic(log_file.read_text())
    assert any("serving" in msg for _, _, msg in lines)
    assert lines[-1] == (proc.pid, "INFO", "stopped (exit 0)")


def test_log_output_in_missing_directory_is_one_line(procs, tmp_path):
    target = tmp_path / "nope" / "x.log"
    proc = procs.chaussette("--log-output", str(target))
    assert proc.wait(15) == 2
    assert proc.output().splitlines() == [
        f"chaussette: error: --log-output {target}: directory {target.parent} does not exist"
    ]


INI_CONFIG = """\
[loggers]
keys=root

[handlers]
keys=file

[formatters]
keys=custom

[logger_root]
level=INFO
handlers=file

[handler_file]
class=FileHandler
formatter=custom
args=({path!r}, 'a')

[formatter_custom]
format=CUSTOM-INI %(name)s %(levelname)s %(message)s
"""


def test_log_config_ini(procs, tmp_path):
    log_file = tmp_path / "ini.log"
    config = tmp_path / "logging.ini"
    config.write_text(INI_CONFIG.format(path=str(log_file)))
    proc, address = start(procs, "--log-config", str(config), "--log-level", "error", ROUTES_APP)
    assert http_request(address, "/").status == 200
    # SIGUSR1 reopens a FileHandler the config made, too
    os.rename(log_file, tmp_path / "ini.log.1")
    proc.send(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not (log_file.exists() and "reopened" in log_file.read_text()):
        assert time.monotonic() < deadline, (tmp_path / "ini.log.1").read_text()
        time.sleep(0.05)
    assert stop(proc) == 0
    assert proc.output() == ""
    old = (tmp_path / "ini.log.1").read_text()
    assert "CUSTOM-INI chaussette INFO chaussette" in old  # --log-level is the config's
    assert f"serving {ROUTES_APP}" in old
    assert '"GET / HTTP/1.1"' not in old  # no access log unless asked for
    new = log_file.read_text()
    assert "CUSTOM-INI chaussette INFO SIGUSR1: reopened 1 log file(s)" in new
    assert new.splitlines()[-1] == "CUSTOM-INI chaussette INFO stopped (exit 0)"


def test_log_config_json_with_access_log(procs, tmp_path):
    config = tmp_path / "logging.json"
    config.write_text(
        json.dumps(
            {
                "version": 1,
                "formatters": {"j": {"format": "CUSTOM-JSON %(name)s %(levelname)s %(message)s"}},
                "handlers": {
                    "out": {
                        "class": "logging.StreamHandler",
                        "stream": "ext://sys.stdout",
                        "formatter": "j",
                    }
                },
                "root": {"level": "INFO", "handlers": ["out"]},
            }
        )
    )
    proc, address = start(procs, "--log-config", str(config), "--access-log", "-", ROUTES_APP)
    assert http_request(address, "/big?size=10").status == 200
    assert stop(proc) == 0
    out = proc.output()
    # the config does not name the "chaussette" logger, which must not be silenced by it
    assert "CUSTOM-JSON chaussette INFO chaussette" in out
    assert f"serving {ROUTES_APP}" in out
    access = [line for line in out.splitlines() if "chaussette.access" in line]
    assert len(access) == 2, out  # wait_http's request, then ours
    assert access[1].startswith("CUSTOM-JSON chaussette.access INFO 127.0.0.1 - - [")
    assert '"GET /big?size=10 HTTP/1.1" 200 10 ' in access[1]


def test_missing_log_config_is_one_line(procs, tmp_path):
    missing = tmp_path / "none.ini"
    proc = procs.chaussette("--log-config", str(missing))
    assert proc.wait(15) == 2
    assert proc.output().splitlines() == [
        f"chaussette: error: --log-config {missing}: no such file"
    ]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad.json", "{not json"),
        ("list.json", "[1, 2]"),
        ("schema.json", '{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}'),
        ("bad.ini", "this is not an ini file\n"),
        ("handler.ini", INI_CONFIG.replace("class=FileHandler", "class=no.such.Handler")),
    ],
)
def test_broken_log_config_is_one_line(procs, tmp_path, name, text):
    config = tmp_path / name
    config.write_text(text.format(path="unused.log") if "{path" in text else text)
    proc = procs.chaussette("--log-config", str(config))
    assert proc.wait(15) == 2
    lines = proc.output().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"chaussette: error: --log-config {config}: ")


def test_access_log_file_one_line_per_request(procs, tmp_path):
    access_file = tmp_path / "access.log"
    proc, address = start(procs, "--access-log", str(access_file), ROUTES_APP)
    # wait_http made one request before we look: start from a known point
    assert http_request(address, "/").status == 200
    assert http_request(address, "/echo", "POST", body=b"hello").status == 200
    assert http_request(address, "/nope?x=1").status == 404
    assert stop(proc) == 0  # the drain waits for the last access line
    lines = access_file.read_text().splitlines()
    parsed = [ACCESS_LINE.match(line) for line in lines]
    assert all(parsed), lines
    got = [(m[1], m[2], m[3], m[4]) for m in parsed if m]
    assert got == [
        ("127.0.0.1", "GET", "/", "200"),  # from wait_http
        ("127.0.0.1", "GET", "/", "200"),
        ("127.0.0.1", "POST", "/echo", "200"),
        ("127.0.0.1", "GET", "/nope?x=1", "404"),
    ]
    assert '"GET /' not in proc.output()  # not in the main log as well


def test_access_log_is_off_by_default(procs):
    proc, address = start(procs, ROUTES_APP)
    assert http_request(address, "/nope").status == 404
    assert stop(proc) == 0
    assert "/nope" not in proc.output()
