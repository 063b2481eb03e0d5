"""APP specs, each through a real ``chaussette`` process answering HTTP, and every way
loading can fail, run as typed: exit code 3 and exactly one ``chaussette: error:`` line.
An exception raised inside the user's own code also shows the user's traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from chaussette import apps
from chaussette.errors import EXIT_APP, AppLoadError
from tests.conftest import (
    ROOT,
    TESTS,
    child_env,
    error_line,
    free_port,
    http_request,
    run_chaussette,
    wait_http,
)

APPS = TESTS / "apps"
WEB = "tests.apps.load_pkg.web"


def serve_body(procs, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Start chaussette with ``args``, return the body of GET /, stop it (exit 0)."""
    port = free_port()
    proc = procs.chaussette("--port", str(port), *args, cwd=cwd, env=env)
    wait_http(("127.0.0.1", port), proc)
    body = http_request(("127.0.0.1", port), "/").body.decode()
    assert proc.stop() == 0, proc.output()
    return body


def run_failing(*args: str, cwd: Path = ROOT) -> tuple[int, str]:
    """Run chaussette to its end (it must not serve); exit code and all its output."""
    return run_chaussette("--port", "0", *args, cwd=cwd)


def line_of(path: Path, marker: str) -> int:
    """The line number of the first line of ``path`` containing ``marker``."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in {path}")


# -- every accepted form, served by a real process --

SERVED = [
    pytest.param([f"{WEB}:app"], "web:app", id="pkg.mod:obj"),
    pytest.param([f"{WEB}.app"], "web:app", id="pkg.mod.obj"),
    pytest.param([f"{WEB}:holder.wsgi"], "web:holder.wsgi", id="pkg.mod:obj.attr"),
    pytest.param([f"{WEB}:create_app()"], "create_app", id="factory-no-args"),
    pytest.param(
        [f"{WEB}:create_app()", "one", "--", "--two"], "create_app one --two", id="factory-ARGS"
    ),
    pytest.param(
        [f"{WEB}:make('x', debug=True)", "y"], "make x y debug=True", id="factory-literals"
    ),
    pytest.param(
        [f"{WEB}:make('/etc/app.conf:main')"],
        "make /etc/app.conf:main debug=False",
        id="factory-literal-path",
    ),
    pytest.param(
        ["tests/apps/load_file_app.py"],
        "load_file_app.py:application load_file_app.py",
        id="path/file.py",
    ),
    pytest.param(["tests/apps/load_app.wsgi"], "load_app.wsgi:application", id="path/app.wsgi"),
    pytest.param(["tests/apps/load_file_app.py:other"], "load_file_app.py:other", id="file.py:obj"),
    pytest.param(["paste:tests/apps/load_paste.ini"], "paste main", id="paste:file.ini"),
    pytest.param(["paste:tests/apps/load_paste.ini#second"], "paste second", id="paste#name"),
    pytest.param(["tests.apps.load_module_app"], "load_module_app:application", id="application"),
    pytest.param(["tests.apps.load_wmain", "a", "b"], "wmain a b", id="wmain(*ARGS)"),
    pytest.param(["tests.apps.load_wmain"], "wmain", id="wmain()"),
    pytest.param(["-A", "tests.apps.load_wmain"], "load_wmain:application", id="-A"),
    pytest.param(
        ["--mod-wsgi", "tests.apps.load_wmain"], "load_wmain:application", id="--mod-wsgi"
    ),
    pytest.param(["tests.apps.load_project"], "load_project.wsgi:application", id="project-pkg"),
    pytest.param(
        ["tests.apps.load_project.wsgi"], "load_project.wsgi:application", id="project.wsgi"
    ),
]


@pytest.mark.parametrize(("args", "body"), SERVED)
def test_app_spec_is_served(procs, args, body):
    assert serve_body(procs, *args) == body


def test_bare_wsgi_file_in_the_working_directory(procs):
    # "app.wsgi" has no directory part: it is the mod_wsgi file, not a dotted module name
    assert serve_body(procs, "load_app.wsgi", cwd=APPS) == "load_app.wsgi:application"


def test_python_path_makes_a_module_importable(procs):
    code, output = run_failing("load_hidden")
    assert code == EXIT_APP
    assert "no module named 'load_hidden'" in error_line(output)
    body = serve_body(procs, "--python-path", "tests/apps/load_pathdir", "load_hidden")
    assert body == "load_hidden:application"


def test_python_path_from_the_environment(procs):
    env = child_env({"CHAUSSETTE_PYTHON_PATH": str(APPS / "load_pathdir")})
    assert serve_body(procs, "load_hidden:application", env=env) == "load_hidden:application"


def test_default_app_is_hello(procs):
    assert serve_body(procs) == "Hello from chaussette\n"


# -- errors in the spec: exit 3 and one line saying what failed, no traceback --

SPEC_ERRORS = [
    # module not found, and which part of the dotted path did import
    pytest.param(["nosuchpkg.mod:app"], ["no module named 'nosuchpkg'"], id="no-top-module"),
    pytest.param(
        ["tests.apps.load_pkg.nosuch:app"],
        ["'tests.apps.load_pkg' imported", "no submodule 'nosuch'"],
        id="no-submodule",
    ),
    pytest.param(
        ["tests.apps.load_pkg.nosuch"],
        ["'tests.apps.load_pkg' imported", "no attribute or submodule 'nosuch'"],
        id="no-submodule-dotted",
    ),
    pytest.param(
        ["tests.apps.load_pkg.nosuch.deeper"],
        ["'tests.apps.load_pkg' imported", "'nosuch'"],
        id="no-submodule-deeper",
    ),
    pytest.param(
        ["tests.apps.routes.nosuch:app"],
        ["'tests.apps.routes' imported", "not a package", "no submodule 'nosuch'"],
        id="module-not-package",
    ),
    # attribute missing
    pytest.param([f"{WEB}:nope"], [f"'{WEB}' imported", "no attribute 'nope'"], id="no-attr"),
    pytest.param([f"{WEB}.nope"], [f"'{WEB}' imported", "no attribute 'nope'"], id="no-attr-dot"),
    pytest.param([f"{WEB}:holder.nope"], ["holder", "no attribute 'nope'"], id="no-attr-attr"),
    pytest.param([f"{WEB}:nope()"], ["no attribute 'nope'"], id="no-factory"),
    pytest.param(
        ["tests.apps.load_pkg"],
        ["tests.apps.load_pkg has no 'application' or 'wmain'", "tests.apps.load_pkg:app"],
        id="module-without-app",
    ),
    pytest.param(
        ["-A", "tests.apps.load_pkg"],
        ["tests.apps.load_pkg has no 'application';"],
        id="-A-module-without-application",
    ),
    # not callable
    pytest.param([f"{WEB}:NOT_CALLABLE"], ["an int (42)", "not callable"], id="not-callable"),
    pytest.param([f"{WEB}.NOT_CALLABLE"], ["an int (42)", "not callable"], id="not-callable-dot"),
    pytest.param(
        [f"{WEB}:returns_none()"], ["returns_none()", "None, not callable"], id="factory-gave-none"
    ),
    pytest.param(
        [f"{WEB}:NOT_CALLABLE()"],
        ["NOT_CALLABLE is an int (42), not callable", "cannot be a factory"],
        id="factory-not-callable",
    ),
    # factory called with wrong arguments
    pytest.param(
        [f"{WEB}:needs_two()", "a"],
        ["needs_two(first, second)", "wrong arguments ('a')", "'second'"],
        id="factory-too-few",
    ),
    pytest.param(
        [f"{WEB}:needs_two('a', 'b')", "c"],
        ["needs_two(first, second)", "wrong arguments ('a', 'b', 'c')", "too many"],
        id="factory-too-many",
    ),
    pytest.param(
        [f"{WEB}:make('x', colour='red')"],
        ["make(name, *rest, debug=False)", "colour='red'", "'colour'"],
        id="factory-bad-keyword",
    ),
    # ARGS given to something that is not a factory
    pytest.param([f"{WEB}:app", "x"], ["ARGS given (x)", f"{WEB}:app()"], id="ARGS-to-obj"),
    pytest.param([f"{WEB}.app", "x"], ["ARGS given (x)", f"{WEB}:app()"], id="ARGS-to-dotted"),
    pytest.param(
        ["tests.apps.load_module_app", "x", "y"],
        ["ARGS given (x y)", "no wmain()"],
        id="ARGS-to-module",
    ),
    pytest.param(
        ["-A", "tests.apps.load_wmain", "x"], ["ARGS given (x)", "no wmain()"], id="ARGS-with-A"
    ),
    pytest.param(
        ["tests/apps/load_file_app.py", "x"],
        ["ARGS given (x)", "tests/apps/load_file_app.py has no wmain()"],
        id="ARGS-to-file",
    ),
    pytest.param(
        ["paste:tests/apps/load_paste.ini", "x"], ["ARGS (x)", "paste: app"], id="ARGS-to-paste"
    ),
    # specs that are not well formed
    pytest.param([f"{WEB}:app[0]"], ["'app[0]' is not an attribute name"], id="subscript"),
    pytest.param([f"{WEB}:make(x)"], ["factory arguments must be literals"], id="non-literal"),
    pytest.param([":app"], ["expected pkg.module:object"], id="no-module"),
    pytest.param([f"{WEB}:"], ["expected pkg.module:object"], id="no-object"),
    pytest.param(["1abc"], ["not a module path"], id="not-identifier"),
    # files
    pytest.param(["tests/apps/load_nosuch.py"], ["no such file", "load_nosuch.py"], id="no-file"),
    pytest.param(
        ["load_nosuch.wsgi"], ["no such file", "no module named 'load_nosuch'"], id="no-wsgi"
    ),
    pytest.param(["tests/apps/load_pkg"], ["is a directory"], id="directory"),
    pytest.param(
        ["tests/apps/load_file_app.py:nope"],
        ["load_file_app.py", "no attribute 'nope'"],
        id="file-no-attr",
    ),
    # paste
    pytest.param(["paste:tests/apps/load_nosuch.ini"], ["no such file"], id="paste-no-file"),
    pytest.param(
        ["paste:tests/apps/load_paste.ini#third"], ["No section 'third'"], id="paste-no-section"
    ),
]


@pytest.mark.parametrize(("args", "fragments"), SPEC_ERRORS)
def test_spec_error_is_one_line_and_exit_3(args, fragments):
    code, output = run_failing(*args)
    assert code == EXIT_APP, output
    line = error_line(output)
    for fragment in fragments:
        assert fragment in line, output
    assert "Traceback" not in output
    spec = next(a for a in args if not a.startswith("-"))
    assert spec in line  # the message names the value the user typed


# -- errors inside the user's code: their traceback, then our one line --

USER_ERRORS = [
    pytest.param(
        ["tests.apps.load_pkg.broken_import:app"],
        "load_pkg/broken_import.py",
        "import load_no_such_dependency",
        ["importing tests.apps.load_pkg.broken_import raised ModuleNotFoundError"],
        id="ModuleNotFoundError-inside",
    ),
    pytest.param(
        ["tests.apps.load_pkg.broken_import.app"],
        "load_pkg/broken_import.py",
        "import load_no_such_dependency",
        ["importing tests.apps.load_pkg.broken_import raised ModuleNotFoundError"],
        id="ModuleNotFoundError-inside-dotted",
    ),
    pytest.param(
        ["tests.apps.load_pkg.bad_name_import:app"],
        "load_pkg/bad_name_import.py",
        "import no_such_name",
        ["importing tests.apps.load_pkg.bad_name_import raised ImportError"],
        id="ImportError-inside",
    ),
    pytest.param(
        ["tests.apps.load_pkg.raises"],
        "load_pkg/raises.py",
        "raise RuntimeError",
        ["importing tests.apps.load_pkg.raises raised RuntimeError"],
        id="raises-on-import",
    ),
    pytest.param(
        ["tests.apps.load_pkg:raises.app"],
        "load_pkg/raises.py",
        "raise RuntimeError",
        ["importing tests.apps.load_pkg.raises raised RuntimeError"],
        id="raises-on-import-as-attribute",
    ),
    pytest.param(
        [f"{WEB}:failing_factory()"],
        "load_pkg/web.py",
        'settings["database"].upper()',
        ["the factory failing_factory() raised AttributeError"],
        id="factory-raises",
    ),
    pytest.param(
        ["tests/apps/load_broken_file.py"],
        "load_broken_file.py",
        'settings["APPLICATION"]',
        ["tests/apps/load_broken_file.py", "raised KeyError"],
        id="file-raises",
    ),
    pytest.param(
        ["tests/apps/load_syntax_error.wsgi"],
        "load_syntax_error.wsgi",
        "def application(environ, start_response)",
        ["tests/apps/load_syntax_error.wsgi", "raised SyntaxError"],
        id="file-SyntaxError",
    ),
    pytest.param(
        ["tests.apps.load_exits"],
        "load_exits.py",
        'sys.exit("load_exits',
        ["importing tests.apps.load_exits raised SystemExit"],
        id="sys.exit-on-import",
    ),
    pytest.param(
        ["paste:tests/apps/load_paste.ini#broken"],
        "load_pkg/web.py",
        'raise LookupError("paste factory',
        ["paste:tests/apps/load_paste.ini#broken", "raised LookupError"],
        id="paste-factory-raises",
    ),
]


@pytest.mark.parametrize(("args", "file", "marker", "fragments"), USER_ERRORS)
def test_user_code_error_shows_their_traceback(args, file, marker, fragments):
    code, output = run_failing(*args)
    assert code == EXIT_APP, output
    line = error_line(output)
    for fragment in fragments:
        assert fragment in line, output
    path = APPS / file
    number = line_of(path, marker)
    assert f'File "{path}", line {number}' in output, output
    assert marker in output  # the source line itself is quoted
    assert output.index(f'File "{path}"') < output.index(line)
    # the frames of chaussette's own loading machinery are not what the user needs to see
    assert f"chaussette{os.sep}apps.py" not in output, output


# -- unit level: the Python API of the loader (no process adds anything here) --


def call(app) -> tuple[str, bytes]:
    seen = []
    body = b"".join(app({}, lambda status, headers, exc_info=None: seen.append(status)))
    return seen[0], body


def test_load_app_returns_the_callable():
    from tests.apps.load_pkg import web

    assert apps.load_app(f"{WEB}:app") is web.app
    assert apps.load_app(f"{WEB}.holder.wsgi") is web.Holder.wsgi
    assert call(apps.load_app(f"{WEB}:make('a', 'b', debug=1)", ["c"])) == (
        "200 OK",
        b"make a b c debug=1",
    )


def test_load_app_user_exception_travels_in_user_exc():
    with pytest.raises(AppLoadError) as info:
        apps.load_app(f"{WEB}:failing_factory()")
    assert isinstance(info.value.user_exc, AttributeError)
    assert info.value.exit_code == EXIT_APP


def test_load_app_spec_error_has_no_user_exc():
    with pytest.raises(AppLoadError) as info:
        apps.load_app(f"{WEB}:needs_two()", ["only-one"])
    assert info.value.user_exc is None
    assert "needs_two(first, second)" in str(info.value)


def test_a_failed_file_load_leaves_no_half_module():
    before = set(sys.modules)
    with pytest.raises(AppLoadError):
        apps.load_app(str(APPS / "load_broken_file.py"))
    leftovers = {m for m in set(sys.modules) - before if m.startswith(apps.FILE_MODULE_PREFIX)}
    assert not leftovers


def test_error_messages_are_one_line():
    for spec in ("nosuchpkg:app", f"{WEB}:needs_two()", "paste:tests/apps/load_paste.ini#x"):
        with pytest.raises(AppLoadError) as info:
            apps.load_app(spec)
        assert "\n" not in str(info.value)
        assert spec.split("#")[0] in str(info.value)


def test_a_file_app_is_compiled_from_its_source_each_time(tmp_path, monkeypatch):
    # a bytecode cache trusts size + mtime in whole seconds: a same-size edit saved in the
    # same second must still be seen (a restart after a quick fix runs the fix)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = tmp_path / "load_quick.py"
    source = (
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [])\n"
        "    return [b'{}']\n"
    )
    path.write_text(source.format("AAAA"))
    assert call(apps.load_app(str(path)))[1] == b"AAAA"
    before = path.stat()
    path.write_text(source.format("BBBB"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert call(apps.load_app(str(path)))[1] == b"BBBB"
