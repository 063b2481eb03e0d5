"""PasteDeploy server runners: ``[server:main] use = egg:chaussette#main`` (HTTP),
``egg:chaussette#fastcgi`` and ``egg:chaussette#scgi``.

The section's keys are chaussette's settings by their registry name (``backend``,
``graceful_timeout``, ``log_level``, ... ``-`` or ``_`` alike), converted from strings by the
registry, plus the classic keys of gevent-fastcgi and flup ini files:

- ``socket = /path``: a unix socket (``host = unix:/path`` says the same);
- ``num_workers = N``: ``workers`` (a pre-fork master, see chaussette/prefork.py);
- ``gevent.monkey.patch_NAME = false`` (or ``patch_NAME``): passed to
  ``gevent.monkey.patch_all(NAME=False)`` on a gevent backend, which then does not patch by
  itself. Only for a gevent backend.

An unknown key stops the runner with one line naming every unknown key. The runner then
serves through the command line's own start path (chaussette.launcher.start): same lifecycle,
signals, draining and exit codes. The application is the one PasteDeploy loaded, so
monkey-patching (and, with workers, the fork) come after it was imported.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from chaussette import launcher
from chaussette.backends import registry
from chaussette.errors import ChaussetteError, UsageError
from chaussette.settings import BY_NAME, OPTIONS, Settings, to_bool

CLASSIC = {"num_workers": "workers"}  # gevent-fastcgi / flup key -> settings name
PATCH_PREFIX = "gevent.monkey."
NOT_HERE = ("app", "args")  # the application comes from the ini's [app:...] section

log = logging.getLogger("chaussette")


def run_http(wsgi_app: Any, global_conf: Mapping[str, Any], **local_conf: Any) -> None:
    """``use = egg:chaussette#main``: HTTP (or any ``protocol`` the section names)."""
    _run("http", wsgi_app, global_conf, local_conf)


def run_fastcgi(wsgi_app: Any, global_conf: Mapping[str, Any], **local_conf: Any) -> None:
    """``use = egg:chaussette#fastcgi``."""
    _run("fastcgi", wsgi_app, global_conf, local_conf)


def run_scgi(wsgi_app: Any, global_conf: Mapping[str, Any], **local_conf: Any) -> None:
    """``use = egg:chaussette#scgi``."""
    _run("scgi", wsgi_app, global_conf, local_conf)


def _run(
    protocol: str, wsgi_app: Any, global_conf: Mapping[str, Any], local_conf: Mapping[str, Any]
) -> None:
    try:
        settings, prepare = build(protocol, global_conf, local_conf)
    except ChaussetteError as exc:
        launcher.report(exc)
        raise SystemExit(exc.exit_code) from None
    code = launcher.run_settings(settings, wsgi_app, prepare)
    if code:
        raise SystemExit(code)


def build(
    protocol: str, global_conf: Mapping[str, Any], local_conf: Mapping[str, Any]
) -> tuple[Settings, Callable[[], None] | None]:
    """Settings (and the gevent patching to do, if any) from a server section."""
    ini = global_conf.get("__file__")
    origin = f"[server] of {ini}" if ini else "[server]"
    strings: dict[str, str] = {}
    patches: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in local_conf.items():
        text = str(value)
        name = key.replace("-", "_")
        if name.startswith(PATCH_PREFIX):
            name = name[len(PATCH_PREFIX) :]
            if not name.startswith("patch_"):
                unknown.append(key)
                continue
        if name.startswith("patch_"):
            patches[name[len("patch_") :]] = text
        elif name == "socket":
            if "host" in local_conf:
                raise UsageError(f"{origin}: socket and host cannot be used together")
            strings["host"] = "unix:" + text
        elif name in NOT_HERE:
            raise UsageError(
                f"{origin}: {key}: the application comes from the ini file's [app:...] section"
            )
        elif name in CLASSIC:
            strings[CLASSIC[name]] = text
        elif name in BY_NAME and not BY_NAME[name].cli_only:
            strings[name] = text
        else:
            unknown.append(key)
    if unknown:
        known = ", ".join(o.name for o in OPTIONS if not o.cli_only and o.name not in NOT_HERE)
        raise UsageError(
            f"{origin}: unknown key(s) {', '.join(unknown)}; known: socket, num_workers, "
            f"gevent.monkey.patch_*, {known}"
        )
    given = strings.get("protocol", protocol)
    if protocol != "http" and given != protocol:
        raise UsageError(
            f"{origin}: protocol = {given} disagrees with egg:chaussette#{protocol} "
            f"(use egg:chaussette#main with protocol = {given})"
        )
    strings["protocol"] = given
    if ini:
        strings["app"] = f"paste:{ini}"
    settings = Settings.from_strings(strings, origin=origin)
    if not patches:
        return settings, None
    return _with_patches(settings, patches, origin)


def _with_patches(
    settings: Settings, patches: dict[str, str], origin: str
) -> tuple[Settings, Callable[[], None]]:
    info = registry.lookup(settings.protocol, settings.backend)
    first = f"gevent.monkey.patch_{next(iter(patches))}"
    if "gevent" not in info.requires:
        raise UsageError(
            f"{origin}: {first} applies only to a gevent backend, not backend = {info.name}"
        )
    if settings.no_monkey:
        raise UsageError(f"{origin}: no_monkey = true and {first} disagree")
    flags: dict[str, bool] = {}
    for name, text in patches.items():
        try:
            flags[name] = to_bool(text)
        except ValueError as exc:
            raise UsageError(f"{origin}: gevent.monkey.patch_{name}: {exc}") from None
    if info.installed():  # else the start reports the missing library
        from gevent import monkey

        accepted = set(inspect.signature(monkey.patch_all).parameters)
        wrong = sorted(set(flags) - accepted)
        if wrong:
            raise UsageError(
                f"{origin}: gevent.monkey.patch_all() has no "
                f"{', '.join(wrong)}; it takes {', '.join(sorted(accepted))}"
            )
    # the backend then leaves the patching to us, with these switches
    values = {name: settings.values[name] for name in settings.explicit}
    values["no_monkey"] = True
    return Settings(**values), functools.partial(_patch_all, flags)


def _patch_all(flags: dict[str, bool]) -> None:
    from gevent import monkey

    monkey.patch_all(**flags)
    shown = ", ".join(f"{name}={value}" for name, value in flags.items())
    log.info("gevent.monkey.patch_all(%s) (pid %d)", shown, os.getpid())
