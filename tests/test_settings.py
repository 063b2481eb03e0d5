"""The one registry of options drives the command line, the environment and ini strings
(``Settings.from_strings``) the same way. Every test iterates ``OPTIONS``: an option added
to the registry is covered without touching this file."""

from __future__ import annotations

import os

import pytest

from chaussette import settings as st
from chaussette.errors import UsageError
from chaussette.settings import OPTIONS, Option, Settings, build_parser, parse_args

# Two good strings (giving different values) and a bad one for each converter, not for each
# option: the registry decides which converter an option uses.
GOOD = {
    st.to_bool: ("true", "false"),
    st.non_negative_int: ("7", "0"),
    st.positive_int: ("3", "5"),
    st.port_number: ("8123", "9123"),
    st.positive_float: ("2.5", "0"),
    st.octal_mode: ("640", "666"),
    st.path_list: (os.pathsep.join(["/srv/a", "/srv/b"]), "/srv/env"),
    st.string: ("some-value", "other-value"),
    st.shell_words: ("one 'two words'", "from-env"),
    st.name_list: ("gzip,buffer", "gzip"),
}
BAD = {
    st.to_bool: "maybe",
    st.non_negative_int: "-1",
    st.positive_int: "0",
    st.port_number: "70000",
    st.positive_float: "soon",
    st.octal_mode: "999",
    st.shell_words: "'unclosed",
    st.name_list: "gzip,,buffer",
}

SETTINGS = [opt for opt in OPTIONS if not opt.cli_only]
FLAGGED = [opt for opt in SETTINGS if not opt.positional]


def ids(opt: Option) -> str:
    return opt.name


def good(opt: Option, which: int = 0) -> str:
    """A valid string for ``opt``; the first one does not give its default."""
    if opt.choices:
        others = [c for c in opt.choices if c != opt.default]
        return others[which] if which < len(others) else str(opt.default)
    return GOOD[opt.convert][which]


def bad(opt: Option) -> str | None:
    if opt.choices:
        return "no-such-choice"
    return BAD.get(opt.convert)


def cli(opt: Option, text: str) -> list[str]:
    """The command line that gives ``opt`` the value ``text``."""
    if opt.switch:
        assert st.to_bool(text)
        return [opt.flags[-1]]
    if opt.name == "app":
        return [text]
    if opt.name == "args":
        return ["tests.apps.load_pkg.web:create_app()", "--", *st.shell_words(text)]
    return [opt.flags[-1], text]


def test_every_converter_is_known_here():
    # a new converter must get a good and (if it can fail) a bad sample above
    for opt in OPTIONS:
        assert opt.choices or opt.convert in GOOD, opt.name


@pytest.mark.parametrize("opt", SETTINGS, ids=ids)
def test_cli_env_and_ini_agree(opt):
    text = good(opt)
    expected = opt.convert(text)
    assert expected != opt.default
    from_cli = parse_args(cli(opt, text), environ={})
    from_env = parse_args([], environ={opt.env: text})
    from_ini = Settings.from_strings({opt.name: text})
    for resolved in (from_cli, from_env, from_ini):
        assert getattr(resolved, opt.name) == expected
        assert opt.name in resolved.explicit


@pytest.mark.parametrize("opt", SETTINGS, ids=ids)
def test_cli_beats_environment(opt):
    on_cli, in_env = good(opt, 0), good(opt, 1)
    assert opt.convert(on_cli) != opt.convert(in_env)
    resolved = parse_args(cli(opt, on_cli), environ={opt.env: in_env})
    assert getattr(resolved, opt.name) == opt.convert(on_cli)


@pytest.mark.parametrize("opt", [o for o in SETTINGS if bad(o) is not None], ids=ids)
def test_bad_value_names_where_it_came_from(opt):
    text = bad(opt)
    with pytest.raises(UsageError) as in_env:
        parse_args([], environ={opt.env: text})
    with pytest.raises(UsageError) as in_ini:
        Settings.from_strings({opt.name: text}, origin="app.ini")
    assert opt.env in str(in_env.value)
    assert f"app.ini {opt.name}" in str(in_ini.value)
    errors = [in_env.value, in_ini.value]
    if not opt.switch and not opt.positional:  # a switch or a positional takes no value
        with pytest.raises(UsageError) as on_cli:
            parse_args(cli(opt, text), environ={})
        assert opt.flags[-1] in str(on_cli.value)
        assert text in str(on_cli.value)
        errors.append(on_cli.value)
    for exc in errors:
        assert "\n" not in str(exc)
        assert exc.exit_code == 2


def test_defaults_when_nothing_is_given():
    resolved = parse_args([], environ={})
    assert resolved.explicit == frozenset()
    for opt in OPTIONS:
        assert getattr(resolved, opt.name) == opt.default
        assert getattr(Settings(), opt.name) == opt.default


def test_environment_names_follow_the_registry():
    for opt in OPTIONS:
        if opt.cli_only:
            assert opt.env is None
        else:
            assert opt.env == "CHAUSSETTE_" + opt.name.upper()


def test_unrelated_environment_is_ignored():
    environ = {"CHAUSSETTE_NO_SUCH_THING": "1", "PORT": "1"}
    assert parse_args([], environ=environ).explicit == frozenset()


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.cli_only], ids=ids)
def test_commands_are_not_settings(opt):
    assert parse_args([opt.flags[-1]], environ={}).values[opt.name] is True
    with pytest.raises(UsageError, match="unknown setting"):
        Settings.from_strings({opt.name: "true"})


def test_ini_keys_may_use_dashes():
    for opt in FLAGGED:
        key = opt.name.replace("_", "-")
        assert getattr(Settings.from_strings({key: good(opt)}), opt.name) == opt.convert(good(opt))


def test_unknown_ini_key_is_refused():
    with pytest.raises(UsageError, match=r"app\.ini: unknown setting 'colour'"):
        Settings.from_strings({"colour": "red"}, origin="app.ini")
    with pytest.raises(UsageError, match="unknown setting"):
        Settings(colour="red")


def test_every_option_is_in_the_help():
    text = build_parser().format_help()
    for opt in OPTIONS:
        for flag in opt.flags:
            assert flag in text, flag
        if opt.positional:
            assert opt.metavar in text


def test_repeated_python_path_accumulates():
    first, second = os.pathsep.join(["/a", "/b"]), "/c"
    resolved = parse_args(["--python-path", first, "--python-path", second], environ={})
    assert resolved.python_path == ["/a", "/b", "/c"]


def test_args_keep_their_words():
    resolved = parse_args(["pkg:factory()", "--port", "1", "a b", "--", "--c"], environ={})
    assert resolved.app == "pkg:factory()"
    assert resolved.args == ("a b", "--c")
    assert resolved.port == 1
    from_env = parse_args(["pkg:factory()"], environ={"CHAUSSETTE_ARGS": "'a b' --c"})
    assert from_env.args == ("a b", "--c")


def test_unknown_flag_is_a_usage_error():
    with pytest.raises(UsageError, match="--colour") as info:
        parse_args(["--colour", "red"], environ={})
    assert "--help" in str(info.value)
