"""WSGI middleware shipped with chaussette, and ``--middleware`` name resolution.

Each middleware is plain PEP 3333 code usable outside chaussette (``chaussette.middleware.gzip``,
``chaussette.middleware.buffer``); this module only maps the short names ``--middleware``
accepts to them. A name is either a short name from ``MIDDLEWARE`` or a dotted path
(``pkg.mod:factory`` or ``pkg.mod.factory``) to a callable that takes the application and
returns the wrapped one. The first name given is the outermost layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Middleware = Callable[[Any], Any]

# short name -> "module:attr", imported only when chosen
MIDDLEWARE: dict[str, str] = {
    "buffer": "chaussette.middleware.buffer:BufferMiddleware",
    "gzip": "chaussette.middleware.gzip:GZipMiddleware",
}


def load(name: str) -> Middleware:
    """The middleware factory ``name`` stands for.

    An unknown short name, or a dotted path that leads to nothing callable, is a
    ``UsageError`` naming it; an exception raised while importing the user's own module is
    an ``AppLoadError`` carrying it, so that its traceback is shown.
    """
    from chaussette import apps
    from chaussette.errors import AppLoadError, UsageError

    check_name(name)
    spec = MIDDLEWARE.get(name, name)
    try:
        return apps.load_callable(spec, "--middleware")
    except AppLoadError as exc:
        if exc.user_exc is not None:
            raise
        raise UsageError(str(exc)) from None


def check_name(name: str) -> None:
    """Refuse what needs no import to refuse: an unknown short name, or options written
    after a short name (``gzip:level=9``), which take none."""
    from chaussette.errors import UsageError

    known = ", ".join(sorted(MIDDLEWARE))
    head = name.replace(":", ".").split(".", 1)[0]
    if name not in MIDDLEWARE and head in MIDDLEWARE:
        raise UsageError(
            f"--middleware {name}: the short name {head!r} takes no options; "
            "for a configured one give a dotted path such as pkg.module:factory"
        )
    if name not in MIDDLEWARE and "." not in name and ":" not in name:
        raise UsageError(
            f"--middleware {name}: unknown middleware (short names: {known}; "
            "or a dotted path such as pkg.module:factory)"
        )


def wrap(app: Any, names: Sequence[str]) -> Any:
    """``app`` wrapped in the middleware ``names``, the first one outermost.

    All names are resolved before any is applied, so a typo in the last one is reported
    without running the factories of the others.
    """
    from chaussette.errors import AppLoadError

    factories = [(name, load(name)) for name in names]
    for name, factory in reversed(factories):
        try:
            app = factory(app)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            raise AppLoadError(
                f"--middleware {name} raised {type(exc).__name__}: {exc}", exc
            ) from None
        if not callable(app):
            raise AppLoadError(f"--middleware {name}: returned {app!r}, not a WSGI callable")
    return app
