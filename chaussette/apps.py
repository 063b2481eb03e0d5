"""APP spec -> WSGI callable.

Accepted specs, tried in this order:

``paste:path/to/file.ini[#name]``
    PasteDeploy's ``loadapp`` (the ``main`` app unless ``#name``).
``path/to/file.py`` / ``app.wsgi`` (optionally ``:obj``)
    The file is compiled from its source (no bytecode cache) and run as a module; then as
    for a module below. Only the part before the first ``:`` decides whether the spec is
    a file; a bare ``name.wsgi`` that does not exist is tried as a module (Django's
    ``mysite.wsgi``).
``pkg.mod:obj``, ``pkg.mod:obj.attr``
    That object.
``pkg.mod:factory()`` / ``pkg.mod:factory('x', debug=True)``
    The factory called with the literal arguments, then with ARGS.
``pkg.mod.obj``
    The longest importable module prefix, then attributes.
``pkg.mod`` (a module)
    ``wmain(*ARGS)`` if the module has one (ashd-wsgi), unless ``-A``; else its
    ``application`` (mod_wsgi); a Django settings module (it has ROOT_URLCONF) is served
    with ``get_wsgi_application()``; a Django project package with a ``wsgi`` submodule
    is served from that.

An exception raised by the user's own code (including an ImportError inside their module,
or a ``sys.exit()`` while it loads) is not rewritten: it travels in ``AppLoadError.user_exc``
so that its traceback is shown. Our own message says which step failed: which part of a
dotted path did import, which attribute is missing, what the object is when it is not
callable, the factory's signature when the arguments do not fit.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from chaussette.errors import AppLoadError, MissingDependency

FILE_SUFFIXES = (".py", ".wsgi")
FILE_MODULE_PREFIX = "_chaussette_app_"  # sys.modules name of an app run from a file

log = logging.getLogger("chaussette")


def add_python_path(paths: Sequence[str]) -> None:
    """Put --python-path entries, then the working directory, in front of sys.path."""
    for entry in paths:
        if not os.path.isdir(entry):
            log.warning("--python-path %s: no such directory", entry)
    for entry in [*paths, os.getcwd()][::-1]:
        entry = os.path.abspath(entry)
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def load_app(spec: str, args: Sequence[str] = (), mod_wsgi: bool = False) -> Callable[..., Any]:
    """The WSGI callable named by ``spec``; ``AppLoadError`` (exit 3) saying why not."""
    if spec.startswith("paste:"):
        if args:
            raise AppLoadError(
                f"{spec}: ARGS ({' '.join(args)}) are not used by a paste: app; "
                "set them in the ini file"
            )
        return _check_callable(spec, load_paste(spec[len("paste:") :]))
    path, attr = _split_file_spec(spec)
    if path is not None:
        module = _load_file(path)
        return _check_callable(spec, _resolve_in_module(spec, module, attr, args, mod_wsgi))
    if ":" in spec:
        module_name, _, expr = spec.partition(":")
        if not module_name or not expr:
            raise AppLoadError(f"{spec}: expected pkg.module:object or pkg.module:factory()")
        module = import_module(module_name, spec)
        return _check_callable(spec, _resolve_in_module(spec, module, expr, args, mod_wsgi))
    module, rest = _import_longest(spec)
    if not rest:
        return _check_callable(spec, _module_app(spec, module, args, mod_wsgi))
    if args:
        raise AppLoadError(
            f"{spec}: ARGS given ({' '.join(args)}) but {spec} is not a factory call; "
            f"write {module.__name__}:{'.'.join(rest)}() to call it with them"
        )
    return _check_callable(spec, _get_attrs(spec, module, rest))


# -- files --


def _split_file_spec(spec: str) -> tuple[str | None, str | None]:
    """A file path, with an optional ``:obj`` after it; ``(None, None)`` if not a file.

    Only the part before the first ``:`` is looked at, so that ``pkg.mod:obj.wsgi`` and
    ``pkg.mod:factory('/etc/app.conf')`` stay module specs.
    """
    head, sep, tail = spec.partition(":")
    is_path = os.sep in head or bool(os.altsep and os.altsep in head)
    if not is_path and not head.endswith(FILE_SUFFIXES):
        return None, None
    if not is_path and not os.path.exists(head):
        # "mysite.wsgi" is also a dotted module name (a Django project's wsgi module)
        top = head.partition(".")[0]
        if top.isidentifier() and importlib.util.find_spec(top) is not None:
            return None, None
        raise AppLoadError(
            f"{spec}: no such file {os.path.abspath(head)}, and no module named {top!r}"
        )
    if os.path.isdir(head):
        raise AppLoadError(
            f"{spec}: {os.path.abspath(head)} is a directory; name a .py or .wsgi file in it"
        )
    if not os.path.isfile(head):
        raise AppLoadError(f"{spec}: no such file {os.path.abspath(head)}")
    return head, (tail if sep else None)


def _load_file(path: str) -> ModuleType:
    """Run a .py/.wsgi file as a module, the way mod_wsgi does; its directory goes on
    sys.path so that it can import its neighbours.

    The source is compiled each time, with no bytecode cache: a cached ``.pyc`` is trusted
    when size and mtime (whole seconds) match, so a quick same-size edit followed by a
    restart would run the old code; and ``app.wsgi`` would share ``app.py``'s cache entry.
    """
    full = os.path.abspath(path)
    name = FILE_MODULE_PREFIX + "".join(c if c.isalnum() else "_" for c in full)
    mod_spec = importlib.util.spec_from_file_location(
        name, full, loader=importlib.machinery.SourceFileLoader(name, full)
    )
    assert mod_spec is not None
    module = importlib.util.module_from_spec(mod_spec)
    directory = os.path.dirname(full)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        with open(full, "rb") as f:
            source = importlib.util.decode_source(f.read())
    except OSError as exc:
        raise AppLoadError(f"{path}: cannot read the file ({exc.strerror})") from None
    sys.modules[name] = module
    try:
        exec(compile(source, full, "exec", dont_inherit=True), module.__dict__)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a sys.exit() while loading is a failure
        sys.modules.pop(name, None)
        raise AppLoadError(f"{path}: running the file raised {_what(exc)}", exc) from None
    return module


def _display(module: ModuleType) -> str:
    """How to name a module in a message: its dotted name, or the file it was run from."""
    if module.__name__.startswith(FILE_MODULE_PREFIX):
        return os.path.relpath(module.__file__ or module.__name__)
    return module.__name__


# -- modules --


class _Missing(Exception):
    """The module asked for (or one of its parents) does not exist; ``name`` is the first
    missing one. Internal: turned into a message by the caller."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _import(name: str, spec: str) -> ModuleType:
    """Import ``name``. ``_Missing`` if it (or a parent) does not exist; ``AppLoadError``
    carrying the user's exception if importing their code raised anything, including an
    ImportError for something their module imports."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise _Missing(exc.name) from None
        raise AppLoadError(
            f"{spec}: importing {_failed_module(name)} raised {_what(exc)}", exc
        ) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise AppLoadError(
            f"{spec}: importing {_failed_module(name)} raised {_what(exc)}", exc
        ) from None


def _failed_module(name: str) -> str:
    """After a failed import of ``name``: the module whose code raised (the first prefix
    of ``name`` that is not in sys.modules; the parents that imported stay there)."""
    parts = name.split(".")
    for cut in range(1, len(parts) + 1):
        prefix = ".".join(parts[:cut])
        if prefix not in sys.modules:
            return prefix
    return name


def _what(exc: BaseException) -> str:
    return f"{type(exc).__name__}, see its traceback"


def import_module(name: str, spec: str) -> ModuleType:
    """Import ``name``; when it does not exist, say which part of the dotted path did."""
    try:
        return _import(name, spec)
    except _Missing as missing:
        raise AppLoadError(f"{spec}: {_not_found(missing.name)}") from None


def _not_found(missing: str) -> str:
    parent, _, last = missing.rpartition(".")
    if not parent:
        return (
            f"no module named {missing!r} (is it installed, or is its directory given "
            "with --python-path?)"
        )
    kind = "package" if hasattr(sys.modules.get(parent), "__path__") else "module, not a package"
    return f"{parent!r} imported ({kind}), but it has no submodule {last!r}"


def _import_longest(spec: str, label: str | None = None) -> tuple[ModuleType, list[str]]:
    """Import the longest module prefix of a dotted ``spec``; the rest are attributes."""
    label = label or spec
    parts = spec.split(".")
    if not all(p.isidentifier() for p in parts):
        raise AppLoadError(
            f"{label}: not a module path (pkg.mod:obj), a .py/.wsgi file, or paste:file.ini"
        )
    for cut in range(len(parts), 0, -1):
        try:
            return _import(".".join(parts[:cut]), label), parts[cut:]
        except _Missing:
            continue  # try a shorter prefix; what is left over are attributes
    raise AppLoadError(f"{label}: {_not_found(parts[0])}")


def _get_attrs(spec: str, obj: Any, names: Sequence[str]) -> Any:
    """``obj.a.b``; a missing attribute of a package may be a submodule to import."""
    where = _display(obj) if isinstance(obj, ModuleType) else repr(obj)
    for attr in names:
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
        elif isinstance(obj, ModuleType) and hasattr(obj, "__path__"):
            try:
                obj = _import(f"{obj.__name__}.{attr}", spec)
            except _Missing:
                raise AppLoadError(
                    f"{spec}: package {where!r} imported, but it has no attribute or "
                    f"submodule {attr!r}"
                ) from None
        elif isinstance(obj, ModuleType):
            raise AppLoadError(
                f"{spec}: module {where!r} imported, but it has no attribute {attr!r}"
            )
        else:
            raise AppLoadError(f"{spec}: {where} has no attribute {attr!r}")
        where = f"{where}.{attr}"
    return obj


# -- what to do with the module or object found --


def _resolve_in_module(
    spec: str, module: ModuleType, expr: str | None, args: Sequence[str], mod_wsgi: bool
) -> Any:
    """What follows the ``:``: an attribute path or a factory call with literal arguments."""
    if expr is None:
        return _module_app(spec, module, args, mod_wsgi)
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise AppLoadError(
            f"{spec}: {expr!r} is not an attribute name (obj.attr) or a call (factory())"
        ) from None
    if isinstance(tree, ast.Call):
        target = _dotted(tree.func)
        if target is None:
            raise AppLoadError(f"{spec}: only name(...) or name.attr(...) calls are supported")
        literal_args, literal_kwargs = _literals(spec, tree)
        factory = _get_attrs(spec, module, target.split("."))
        return call_factory(spec, factory, [*literal_args, *args], literal_kwargs, target)
    target = _dotted(tree)
    if target is None:
        raise AppLoadError(
            f"{spec}: {expr!r} is not an attribute name (obj.attr) or a call (factory())"
        )
    if args:
        raise AppLoadError(
            f"{spec}: ARGS given ({' '.join(args)}) but {expr} is not a factory call; "
            f"write {_display(module)}:{expr}() to call it with them"
        )
    return _get_attrs(spec, module, target.split("."))


def _literals(spec: str, call: ast.Call) -> tuple[list[Any], dict[str, Any]]:
    try:
        if any(k.arg is None for k in call.keywords):
            raise ValueError("**")
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {str(k.arg): ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError):
        raise AppLoadError(
            f"{spec}: factory arguments must be literals (strings, numbers, True, None, ...)"
        ) from None
    return args, kwargs


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def call_factory(
    spec: str,
    factory: Any,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    name: str | None = None,
) -> Any:
    """Call an app factory; wrong arguments get our message, errors inside it the user's."""
    kwargs = kwargs or {}
    name = name or getattr(factory, "__qualname__", None) or repr(factory)
    if not callable(factory):
        raise AppLoadError(
            f"{spec}: {name} is {_a(factory)}, not callable, so it cannot be a factory"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            raise AppLoadError(
                f"{spec}: factory {name}{_plain(signature)} called with wrong arguments "
                f"({shown}): {exc}"
            ) from None
    try:
        return factory(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise AppLoadError(f"{spec}: the factory {name}() raised {_what(exc)}", exc) from None


def _plain(signature: inspect.Signature) -> str:
    """A signature without annotations: ``(name, debug=False)``."""
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=params, return_annotation=empty))


def _a(obj: Any) -> str:
    """``None``, ``an int (42)``, ``a module``: what a wrong object is, for a message."""
    if obj is None:
        return "None"
    kind = type(obj).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    shown = repr(obj)
    return f"{article} {kind} ({shown})" if len(shown) <= 40 else f"{article} {kind}"


def _module_app(spec: str, module: ModuleType, args: Sequence[str], mod_wsgi: bool) -> Any:
    """The app a module stands for (ashd-wsgi wmain, mod_wsgi application, Django)."""
    name = _display(module)
    if not mod_wsgi and hasattr(module, "wmain"):
        return call_factory(spec, module.wmain, args, name=f"{name}:wmain")
    if args:
        raise AppLoadError(
            f"{spec}: ARGS given ({' '.join(args)}) but {name} has no wmain() to receive them"
        )
    if hasattr(module, "application"):
        return module.application
    if hasattr(module, "ROOT_URLCONF"):
        return _django_app(spec, module.__name__)
    wsgi = _django_wsgi_submodule(module, spec)
    if wsgi is not None and hasattr(wsgi, "application"):
        return wsgi.application
    wanted = "'application'" if mod_wsgi else "'application' or 'wmain'"
    raise AppLoadError(f"{spec}: {name} has no {wanted}; name the object, e.g. {name}:app")


def _django_wsgi_submodule(module: ModuleType, spec: str) -> ModuleType | None:
    if not hasattr(module, "__path__"):
        return None
    name = module.__name__ + ".wsgi"
    if importlib.util.find_spec(name) is None:
        return None
    return import_module(name, spec)


def _django_app(spec: str, settings_module: str) -> Any:
    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    if importlib.util.find_spec("django") is None:
        raise MissingDependency(f"{spec} (a Django settings module)", "django", "django")
    from django.core.wsgi import get_wsgi_application

    try:
        return get_wsgi_application()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise AppLoadError(f"{spec}: Django raised {_what(exc)} while setting up", exc) from None


def load_paste(target: str) -> Any:
    """``loadapp`` of a PasteDeploy ini file, ``path[#name]``."""
    path, _, name = target.partition("#")
    if (
        importlib.util.find_spec("paste") is None
        or importlib.util.find_spec("paste.deploy") is None
    ):
        raise MissingDependency("paste: apps", "PasteDeploy", "paste")
    from paste.deploy import loadapp

    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise AppLoadError(f"paste:{target}: no such file {full}")
    try:
        return loadapp(f"config:{full}", name=name or None)
    except LookupError as exc:
        if _raised_in(exc, os.path.dirname(loadapp.__code__.co_filename)):
            raise AppLoadError(f"paste:{target}: {exc}") from None  # e.g. no such section
        raise AppLoadError(f"paste:{target}: loading raised {_what(exc)}", exc) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise AppLoadError(f"paste:{target}: loading raised {_what(exc)}", exc) from None


def _raised_in(exc: BaseException, directory: str) -> bool:
    """Was ``exc`` raised by code under ``directory`` (not by the user's code it called)?"""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(directory + os.sep)


def _check_callable(spec: str, obj: Any) -> Callable[..., Any]:
    if not callable(obj):
        raise AppLoadError(
            f"{spec}: that is {_a(obj)}, not callable; a WSGI app is a "
            "callable(environ, start_response)"
        )
    return obj  # type: ignore[no-any-return]


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """A dotted ``pkg.mod:func`` or ``pkg.mod.func`` for hooks."""
    label = f"{what} {spec}"
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        module = import_module(module_name, label)
        obj = _get_attrs(label, module, attr.split("."))
    else:
        module, rest = _import_longest(spec, label)
        if not rest:
            raise AppLoadError(f"{label}: names a module, not a callable")
        obj = _get_attrs(label, module, rest)
    if not callable(obj):
        raise AppLoadError(f"{what} {spec}: that is {_a(obj)}, not a callable")
    return obj  # type: ignore[no-any-return]
