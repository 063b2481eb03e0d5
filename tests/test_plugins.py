"""Third-party backends through the ``chaussette.backends`` entry point group.

The plugin is a real distribution as far as importlib.metadata is concerned: a
``.dist-info`` directory with ``entry_points.txt`` on the child's path."""

from __future__ import annotations

import pytest

from tests.conftest import (
    ROOT,
    ROUTES_APP,
    child_env,
    error_line,
    free_port,
    http_request,
    run_chaussette,
    wait_http,
)

ENTRY_POINTS = """\
[chaussette.backends]
plugged = tests.apps.plugin_backend:INFO
broken = tests.apps.plugin_backend_nowhere:INFO
notinfo = tests.apps.plugin_backend:NOT_INFO
shadow = tests.apps.plugin_backend:SHADOWS_BUILTIN
"""


@pytest.fixture
def plugin_env(tmp_path):
    dist = tmp_path / "chaussette_testplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: chaussette-testplugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return child_env({"PYTHONPATH": f"{ROOT}:{tmp_path}"})


def test_backends_table_lists_the_plugin_and_its_broken_siblings(plugin_env):
    code, output = run_chaussette("--backends", env=plugin_env)
    assert code == 0, output
    rows = {line.split()[1]: line for line in output.splitlines() if line.startswith("http ")}
    assert "plugged" in rows and "a test plugin" in rows["plugged"]
    assert "plugin 'broken' not loaded: tests.apps.plugin_backend_nowhere:INFO" in output
    assert "plugin 'notinfo' not loaded" in output and "not a chaussette BackendInfo" in output
    assert "plugin 'shadow' not loaded" in output and "built in" in output


def test_a_plugin_backend_serves(procs, plugin_env):
    port = free_port()
    proc = procs.chaussette("--backend", "plugged", "--port", str(port), ROUTES_APP, env=plugin_env)
    wait_http(("127.0.0.1", port), proc)
    resp = http_request(("127.0.0.1", port), "/")
    assert resp.body == b"hello"
    assert resp.header("X-Backend") == "plugged"
    assert "with backend plugged" in proc.output()
    assert proc.stop() == 0


def test_a_plugin_backend_gets_the_option_checks(plugin_env):
    code, output = run_chaussette("--backend", "plugged", "--spawn", "3", env=plugin_env)
    assert code == 2
    line = error_line(output)
    assert "--spawn" in line and "--backend plugged" in line


def test_a_broken_plugin_is_one_line_when_chosen(plugin_env):
    code, output = run_chaussette("--backend", "broken", "--port", "0", env=plugin_env)
    assert code == 2
    line = error_line(output)
    assert "--backend broken: its plugin failed to load" in line
    assert "ModuleNotFoundError" in line


def test_a_broken_plugin_does_not_break_other_backends(procs, plugin_env):
    port = free_port()
    proc = procs.chaussette("--port", str(port), ROUTES_APP, env=plugin_env)
    wait_http(("127.0.0.1", port), proc)
    assert proc.stop() == 0
