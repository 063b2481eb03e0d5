"""``python manage.py runchaussette [options] [ADDR:PORT]``: serve this Django project through
chaussette.

The options are chaussette's own, derived from its settings registry (``--protocol``,
``--backend``, ``--workers``, ``--graceful-timeout``, ...; ``CHAUSSETTE_*`` environment
variables too). ``ADDR:PORT`` is read as ``runserver`` reads it (``8000``, ``0.0.0.0:8000``,
``[::1]:8000``) and also takes ``unix:/path`` or ``fd://N``; it stands for ``--host``/``--port``.
The application is the project's ``WSGI_APPLICATION``, loaded as ``runserver`` loads it, and it
is served through chaussette's command-line start path: same lifecycle, signals, draining and
exit codes.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chaussette import launcher
from chaussette.errors import ChaussetteError
from chaussette.settings import OPTIONS, Option, parse_args


def _arguments(opt: Option) -> dict[str, Any]:
    """argparse keywords for one registry option; values stay strings, converted later by
    ``parse_args`` exactly as on chaussette's own command line."""
    help_text = opt.help
    if opt.default not in (None, False, ()):
        help_text += f" Default: {opt.default}."
    if opt.switch:
        return {"action": "store_true", "help": help_text}
    return {
        "metavar": opt.metavar or opt.name.upper(),
        "action": "append" if opt.many else "store",
        "choices": opt.choices,
        "help": help_text,
    }


def options() -> list[Option]:
    """The registry options this command takes: not the APP/ARGS positionals (the app is the
    project's), not --version/--backends."""
    return [opt for opt in OPTIONS if not opt.positional and not opt.cli_only]


def split_addrport(text: str) -> list[str]:
    """``[ADDR:]PORT`` (or ``unix:/path``, ``fd://N``) -> chaussette arguments."""
    if text.startswith(("unix:", "fd://")):
        return [f"--host={text}"]
    if text.isdigit():
        return [f"--port={text}"]
    host, sep, port = text.rpartition(":")
    if not sep or not host or (":" in host and not host.startswith("[")):
        raise CommandError(f"{text!r} is not PORT, ADDR:PORT, [IPv6]:PORT, unix:/path or fd://N")
    return [f"--host={host}", f"--port={port}"]


def forget_connections() -> None:
    """Close and drop the database connections the checks may have opened: forked workers
    must not share them, and after gevent or eventlet monkey-patching the thread that made
    them no longer exists (Django would refuse to close them at exit)."""
    from django.db import connections

    connections.close_all()
    for conn in connections.all(initialized_only=True):
        del connections[conn.alias]


class Command(BaseCommand):  # type: ignore[misc]  # django is untyped
    help = (
        "Serve this project's WSGI application with chaussette: HTTP, FastCGI or SCGI, "
        "on any of its backends."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "addrport",
            nargs="?",
            metavar="ADDR:PORT",
            help="Where to listen: PORT, ADDR:PORT, [IPv6]:PORT, unix:/path or fd://N "
            "(instead of --host/--port).",
        )
        group = parser.add_argument_group("chaussette")
        for opt in options():
            group.add_argument(
                *opt.flags, dest=opt.name, default=argparse.SUPPRESS, **_arguments(opt)
            )

    def handle(self, *args: Any, **given: Any) -> None:
        argv = self.chaussette_argv(given)
        try:
            app = self.application()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        forget_connections()
        try:
            settings = parse_args(argv)  # --protocol fastcgi alone gets its default engine
        except ChaussetteError as exc:
            launcher.report(exc)
            raise SystemExit(exc.exit_code) from None
        code = launcher.run_settings(settings, app)
        if code:
            raise SystemExit(code)

    def chaussette_argv(self, given: dict[str, Any]) -> list[str]:
        """The chaussette command line these options stand for (the app spec last, shown
        in the log)."""
        argv: list[str] = []
        for opt in options():
            if opt.name not in given:
                continue
            value = given[opt.name]
            flag = opt.flags[-1]
            if opt.switch:
                if value:
                    argv.append(flag)
            elif opt.many:
                argv += [f"{flag}={item}" for item in value]
            else:
                argv.append(f"{flag}={value}")  # one word: a value may start with "-"
        addrport = given.get("addrport")
        if addrport:
            both = [f for f in ("--host", "--port", "--fd") if any(a.startswith(f) for a in argv)]
            if both:
                raise CommandError(f"ADDR:PORT and {both[0]} cannot be used together")
            argv += split_addrport(addrport)
        wsgi_name = getattr(django_settings, "WSGI_APPLICATION", None) or "django"
        argv.append(str(wsgi_name))
        return argv

    def application(self) -> Any:
        from django.core.servers.basehttp import get_internal_wsgi_application

        return get_internal_wsgi_application()
