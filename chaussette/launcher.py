"""From consistent settings to a serving process, for every front end: the command line,
the paste server runners and the Django command. Every error becomes one clear line."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from chaussette import __version__, apps, lifecycle, logs, middleware, prefork, sockets
from chaussette.backends import registry
from chaussette.errors import (
    EXIT_RUNTIME,
    AppLoadError,
    ChaussetteError,
    HookError,
    MissingDependency,
)
from chaussette.settings import Settings, check

if TYPE_CHECKING:
    from chaussette.backends.base import Server
    from chaussette.wsgi import WSGIApp

log = logging.getLogger("chaussette")


def report(exc: ChaussetteError) -> None:
    """The user's traceback when their code failed, then our one line."""
    user_exc = getattr(exc, "user_exc", None)
    if user_exc is not None:
        tb = _trim(user_exc.__traceback__)
        traceback.print_exception(type(user_exc), user_exc, tb, file=sys.stderr)
    # one line, whatever the message carries (a library's message may span several)
    line = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    print(f"chaussette: error: {line}", file=sys.stderr, flush=True)
    _log_to_files(line, user_exc)


def _log_to_files(line: str, user_exc: BaseException | None) -> None:
    """Also put the error in the log files (--log-output FILE, --log-config), where an
    operator looks first; the terminal already has it."""
    root = logging.getLogger()
    standard = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    if not any(getattr(h, "stream", None) not in standard for h in root.handlers):
        return
    for handler in root.handlers:
        if getattr(handler, "stream", None) in standard:
            root.removeHandler(handler)  # said once on the terminal is enough
    exc_info = (type(user_exc), user_exc, _trim(user_exc.__traceback__)) if user_exc else None
    log.error("%s", line, exc_info=exc_info)


def _trim(tb: TracebackType | None) -> TracebackType | None:
    """Drop the leading frames of chaussette and importlib: the user's code starts after.
    (A SyntaxError has no frame of its own: its message names the file and line.)"""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not (filename.startswith(here) or "importlib" in filename):
            break
        tb = tb.tb_next
    return tb


def start(
    settings: Settings,
    app: WSGIApp | None = None,
    prepare: Callable[[], None] | None = None,
) -> int:
    """Everything after the settings are known to be consistent.

    ``app`` is an application already loaded (a paste server runner, the Django command);
    ``prepare`` runs before the backend's own ``prepare`` (paste's gevent.monkey switches).
    With --workers, preparing, loading the app and serving happen in each forked worker.
    """
    logs.setup(settings.log_level, settings.log_output, settings.log_config, settings.access_log)
    if settings.use_reloader and importlib.util.find_spec("watchfiles") is None:
        raise MissingDependency("--use-reloader", "watchfiles", "reload")
    info = registry.lookup(settings.protocol, settings.backend)
    server_class = info.load()

    def prepare_process() -> None:  # before the app is imported: monkey-patching
        if prepare is not None:
            prepare()
        server_class.prepare(settings)

    if not settings.workers:
        prepare_process()
    apps.add_python_path(settings.python_path)
    pre_hook = load_hook(settings, "pre_hook")
    if pre_hook is not None:
        call_hook(settings, "pre_hook", pre_hook)
    post_hook = load_hook(settings, "post_hook")  # a typo is reported now, not at the end
    for name in settings.middleware:  # likewise, before any app import or fork
        middleware.check_name(name)
    listener = sockets.get_listener(settings) if info.listens else sockets.outbound(settings)
    try:
        if settings.workers:

            def worker() -> int:  # in each forked child; errors end that child only
                try:
                    prepare_process()
                    return serve(settings, listener, info, server_class, app)
                except ChaussetteError as exc:
                    report(exc)
                    return exc.exit_code

            code = prefork.run(settings, listener, worker)
        else:
            code = serve(settings, listener, info, server_class, app)
    finally:
        listener.close()
    if post_hook is not None:
        try:
            call_hook(settings, "post_hook", post_hook)
        except HookError as exc:
            report(exc)
            return EXIT_RUNTIME
    log.info("stopped (exit %d)", code)
    return code


def serve(
    settings: Settings,
    listener: sockets.Listener,
    info: registry.BackendInfo,
    server_class: type[Server],
    app: WSGIApp | None,
) -> int:
    """Load the app (unless given) and serve it on ``listener`` until told to stop."""
    if app is None:
        app = apps.load_app(settings.app, settings.args, settings.mod_wsgi)
    if settings.middleware:
        app = middleware.wrap(app, settings.middleware)
    server = server_class(app, listener, settings)
    log.info(
        "chaussette %s (pid %d): serving %s on %s with backend %s (%s)",
        __version__,
        os.getpid(),
        settings.app,
        listener.describe(settings.protocol),
        info.name,
        info.summary,
    )
    try:
        return lifecycle.serve(server, listener, settings)
    finally:
        server.close()


def run_settings(
    settings: Settings,
    app: WSGIApp | None = None,
    prepare: Callable[[], None] | None = None,
) -> int:
    """Check and start settings built elsewhere (paste ini, Django command); errors are
    reported as on the command line. Returns the exit code."""
    try:
        check(settings)
        prefork.check(settings)
        return start(settings, app, prepare)
    except ChaussetteError as exc:
        report(exc)
        return exc.exit_code


def load_hook(settings: Settings, name: str) -> Callable[[Settings], Any] | None:
    """The callable named by --pre-hook / --post-hook, or None when not set."""
    spec = getattr(settings, name)
    if not spec:
        return None
    try:
        return apps.load_callable(spec, _flag(name))
    except AppLoadError as exc:
        raise HookError(str(exc), exc.user_exc) from None


def call_hook(settings: Settings, name: str, hook: Callable[[Settings], Any]) -> None:
    try:
        hook(settings)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        spec = getattr(settings, name)
        raise HookError(f"{_flag(name)} {spec} raised {type(exc).__name__}: {exc}", exc) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
