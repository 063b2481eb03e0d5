"""argv -> Settings -> a serving process; every error -> one clear line and an exit code."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from chaussette import __version__, apps, lifecycle, logs, sockets
from chaussette.backends import registry
from chaussette.errors import (
    EXIT_OK,
    EXIT_RUNTIME,
    AppLoadError,
    ChaussetteError,
    HookError,
    MissingDependency,
)
from chaussette.settings import Settings, check, parse_args

log = logging.getLogger("chaussette")


def main(argv: Sequence[str] | None = None) -> int:
    """Run chaussette; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = parse_args(argv)
        if settings.version:
            print(f"chaussette {__version__}")
            return EXIT_OK
        if settings.list_backends:
            print(registry.table())
            return EXIT_OK
        check(settings)
        return start(settings)
    except ChaussetteError as exc:
        report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("chaussette: interrupted", file=sys.stderr)
        return EXIT_RUNTIME


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


def report(exc: ChaussetteError) -> None:
    """The user's traceback when their code failed, then our one line."""
    user_exc = getattr(exc, "user_exc", None)
    if user_exc is not None:
        tb = _trim(user_exc.__traceback__)
        traceback.print_exception(type(user_exc), user_exc, tb, file=sys.stderr)
    print(f"chaussette: error: {exc}", file=sys.stderr)


def _trim(tb: object) -> object:
    """Drop the leading frames of chaussette and importlib: the user's code starts after."""
    here = os.path.dirname(os.path.abspath(__file__))
    while tb is not None and tb.tb_next is not None:  # type: ignore[attr-defined]
        filename = tb.tb_frame.f_code.co_filename  # type: ignore[attr-defined]
        if not (filename.startswith(here) or "importlib" in filename):
            break
        tb = tb.tb_next  # type: ignore[attr-defined]
    return tb


def start(settings: Settings) -> int:
    """Everything after the settings are known to be consistent."""
    logs.setup(settings.log_level, settings.log_output, settings.log_config,
               settings.access_log)
    if settings.use_reloader and importlib.util.find_spec("watchfiles") is None:
        raise MissingDependency("--use-reloader", "watchfiles", "reload")
    info = registry.lookup(settings.protocol, settings.backend)
    server_class = info.load()
    apps.add_python_path(settings.python_path)
    run_hook(settings, "pre_hook")
    listener = sockets.get_listener(settings)
    try:
        app = apps.load_app(settings.app, settings.args, settings.mod_wsgi)
        server = server_class(app, listener, settings)
        log.info("chaussette %s (pid %d): serving %s on %s with backend %s (%s)",
                 __version__, os.getpid(), settings.app, listener.describe(), info.name,
                 info.summary)
        try:
            code = lifecycle.serve(server, listener, settings)
        finally:
            server.close()
    finally:
        listener.close()
    try:
        run_hook(settings, "post_hook")
    except HookError as exc:
        report(exc)
        return EXIT_RUNTIME
    log.info("stopped (exit %d)", code)
    return code


def run_hook(settings: Settings, name: str) -> None:
    spec = getattr(settings, name)
    if not spec:
        return
    flag = "--" + name.replace("_", "-")
    try:
        hook = apps.load_callable(spec, flag)
    except AppLoadError as exc:
        raise HookError(str(exc), exc.user_exc) from None
    try:
        hook(settings)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise HookError(f"{flag} {spec} raised {type(exc).__name__}: {exc}", exc) from None
