"""APP spec -> WSGI callable.

Accepted specs, tried in this order:

``paste:path/to/file.ini[#name]``
    PasteDeploy's ``loadapp`` (the ``main`` app unless ``#name``).
``path/to/file.py`` / ``app.wsgi`` (optionally ``:obj``)
    The file is run as a module; then as for a module below.
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

An exception raised by the user's own code (including an ImportError inside their module)
is not rewritten: it travels in ``AppLoadError.user_exc`` so that its traceback is shown.
Our own message says which step failed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from chaussette.errors import AppLoadError, MissingDependency

FILE_SUFFIXES = (".py", ".wsgi")


def add_python_path(paths: Sequence[str]) -> None:
    """Put --python-path entries and the working directory in front of sys.path."""
    for entry in [*paths, os.getcwd()][::-1]:
        entry = os.path.abspath(entry)
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def load_app(spec: str, args: Sequence[str] = (), mod_wsgi: bool = False) -> Callable[..., Any]:
    """The WSGI callable named by ``spec``."""
    if spec.startswith("paste:"):
        if args:
            raise AppLoadError(f"{spec}: ARGS are not used by a paste: app ({' '.join(args)})")
        return _check_callable(spec, load_paste(spec[len("paste:"):]))
    path, attr = _split_file_spec(spec)
    if path is not None:
        module = _load_file(path)
        obj = _resolve_in_module(spec, module, attr, args, mod_wsgi)
        return _check_callable(spec, obj)
    if ":" in spec:
        module_name, _, expr = spec.partition(":")
        if not module_name or not expr:
            raise AppLoadError(f"{spec!r}: expected pkg.module:object")
        module = import_module(module_name, spec)
        obj = _resolve_in_module(spec, module, expr, args, mod_wsgi)
        return _check_callable(spec, obj)
    module, rest = _import_longest(spec)
    if rest:
        obj = _get_attrs(spec, module, rest)
        if args:
            raise AppLoadError(f"{spec}: ARGS given ({' '.join(args)}) but {spec} is not a "
                               f"factory call; write {module.__name__}:{'.'.join(rest)}()")
    else:
        obj = _module_app(spec, module, args, mod_wsgi)
    return _check_callable(spec, obj)


def _split_file_spec(spec: str) -> tuple[str | None, str | None]:
    """A file path, with an optional ``:obj`` after it."""
    path, attr = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(FILE_SUFFIXES):
        path, attr = head, tail
    if path.endswith(FILE_SUFFIXES) or os.sep in path:
        if path.endswith(".py") and os.sep not in path and not os.path.exists(path):
            return None, None  # "mod.py" is not a dotted name anyone means; fall through
        if not os.path.isfile(path):
            raise AppLoadError(f"{spec}: no such file {os.path.abspath(path)}")
        return path, attr
    return None, None


def _load_file(path: str) -> ModuleType:
    """Run a .py/.wsgi file as a module, the way mod_wsgi does."""
    full = os.path.abspath(path)
    name = "_chaussette_app_" + "".join(c if c.isalnum() else "_" for c in full)
    loader = importlib.machinery.SourceFileLoader(name, full)
    mod_spec = importlib.util.spec_from_loader(name, loader)
    assert mod_spec is not None
    module = importlib.util.module_from_spec(mod_spec)
    directory = os.path.dirname(full)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise AppLoadError(f"{path}: the file raised {type(exc).__name__} while loading",
                           exc) from None
    return module


def import_module(name: str, spec: str) -> ModuleType:
    """Import ``name``; say which part of the dotted path did import when it fails."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise AppLoadError(f"{spec}: {_not_found(name, missing)}") from None
        raise AppLoadError(f"{spec}: importing {name} raised {type(exc).__name__}", exc) \
            from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise AppLoadError(f"{spec}: importing {name} raised {type(exc).__name__}", exc) \
            from None


def _not_found(name: str, missing: str) -> str:
    parent = missing.rpartition(".")[0]
    if not parent:
        return (f"no module named {missing!r} (is it installed, or is its directory in "
                "--python-path?)")
    return f"module {parent!r} imported, but it has no submodule {missing.rpartition('.')[2]!r}"


def _import_longest(spec: str) -> tuple[ModuleType, list[str]]:
    """Import the longest module prefix of a dotted ``spec``; the rest are attributes."""
    parts = spec.split(".")
    if not all(p.isidentifier() for p in parts):
        raise AppLoadError(f"{spec!r}: not a module path, a file, or paste:file.ini")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            return importlib.import_module(name), parts[cut:]
        except ModuleNotFoundError as exc:
            if exc.name != name:
                if exc.name and name.startswith(exc.name + "."):
                    continue  # a parent is missing too: try a shorter prefix
                raise AppLoadError(f"{spec}: importing {name} raised ModuleNotFoundError",
                                   exc) from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            raise AppLoadError(f"{spec}: importing {name} raised {type(exc).__name__}",
                               exc) from None
    raise AppLoadError(f"{spec}: {_not_found(parts[0], parts[0])}")


def _get_attrs(spec: str, obj: Any, names: Sequence[str]) -> Any:
    where = getattr(obj, "__name__", repr(obj))
    for attr in names:
        if isinstance(obj, ModuleType):
            try:
                sub = importlib.import_module(f"{obj.__name__}.{attr}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{obj.__name__}.{attr}":
                    raise AppLoadError(f"{spec}: importing {obj.__name__}.{attr} raised "
                                       "ModuleNotFoundError", exc) from None
            else:
                obj, where = sub, sub.__name__
                continue
        if not hasattr(obj, attr):
            raise AppLoadError(f"{spec}: {where} has no attribute {attr!r}")
        obj = getattr(obj, attr)
        where = f"{where}.{attr}"
    return obj


def _resolve_in_module(spec: str, module: ModuleType, expr: str | None, args: Sequence[str],
                       mod_wsgi: bool) -> Any:
    if expr is None:
        return _module_app(spec, module, args, mod_wsgi)
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise AppLoadError(f"{spec}: {expr!r} is not an attribute name or a call") from None
    if isinstance(tree, ast.Call):
        target = _dotted(tree.func)
        if target is None:
            raise AppLoadError(f"{spec}: only name(...) calls are supported")
        try:
            literal_args = [ast.literal_eval(a) for a in tree.args]
            literal_kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords if k.arg}
        except ValueError:
            raise AppLoadError(f"{spec}: factory arguments must be literals "
                               "(strings, numbers, ...)") from None
        factory = _get_attrs(spec, module, target.split("."))
        return call_factory(spec, factory, [*literal_args, *args], literal_kwargs)
    target = _dotted(tree)
    if target is None:
        raise AppLoadError(f"{spec}: {expr!r} is not an attribute name or a call")
    if args:
        raise AppLoadError(f"{spec}: ARGS given ({' '.join(args)}) but {expr} is not a factory "
                           f"call; write {module.__name__}:{expr}()")
    return _get_attrs(spec, module, target.split("."))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def call_factory(spec: str, factory: Any, args: Sequence[Any],
                 kwargs: dict[str, Any] | None = None) -> Any:
    """Call an app factory; wrong arguments get our message, errors inside it the user's."""
    kwargs = kwargs or {}
    name = getattr(factory, "__qualname__", repr(factory))
    if not callable(factory):
        raise AppLoadError(f"{spec}: {name} is not callable, so it cannot be a factory")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            raise AppLoadError(f"{spec}: factory {name}{signature} called with wrong "
                               f"arguments ({shown}): {exc}") from None
    try:
        return factory(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise AppLoadError(f"{spec}: the factory {name}() raised {type(exc).__name__}",
                           exc) from None


def _module_app(spec: str, module: ModuleType, args: Sequence[str], mod_wsgi: bool) -> Any:
    if not mod_wsgi and hasattr(module, "wmain"):
        return call_factory(spec, module.wmain, args)
    if args:
        raise AppLoadError(f"{spec}: ARGS given ({' '.join(args)}) but {module.__name__} has "
                           "no wmain() to receive them")
    if hasattr(module, "application"):
        return module.application
    if hasattr(module, "ROOT_URLCONF"):
        return _django_app(spec, module.__name__)
    wsgi = _django_wsgi_submodule(module)
    if wsgi is not None and hasattr(wsgi, "application"):
        return wsgi.application
    wanted = "'application'" if mod_wsgi else "'application' or 'wmain'"
    raise AppLoadError(f"{spec}: module {module.__name__} has no {wanted}; "
                       f"name the object, e.g. {module.__name__}:app")


def _django_wsgi_submodule(module: ModuleType) -> ModuleType | None:
    if not hasattr(module, "__path__"):
        return None
    name = module.__name__ + ".wsgi"
    if importlib.util.find_spec(name) is None:
        return None
    return import_module(name, name)


def _django_app(spec: str, settings_module: str) -> Any:
    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    if importlib.util.find_spec("django") is None:
        raise MissingDependency(f"{spec} (a Django settings module)", "django", "django")
    from django.core.wsgi import get_wsgi_application

    try:
        return get_wsgi_application()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise AppLoadError(f"{spec}: Django raised {type(exc).__name__} while setting up",
                           exc) from None


def load_paste(target: str) -> Any:
    path, _, name = target.partition("#")
    if importlib.util.find_spec("paste") is None or importlib.util.find_spec(
        "paste.deploy") is None:
        raise MissingDependency("paste: apps", "PasteDeploy", "paste")
    from paste.deploy import loadapp

    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise AppLoadError(f"paste:{target}: no such file {full}")
    try:
        return loadapp(f"config:{full}", name=name or None)
    except LookupError as exc:
        raise AppLoadError(f"paste:{target}: {exc}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise AppLoadError(f"paste:{target}: loading raised {type(exc).__name__}", exc) \
            from None


def _check_callable(spec: str, obj: Any) -> Callable[..., Any]:
    if not callable(obj):
        raise AppLoadError(f"{spec}: resolved to a {type(obj).__name__}, which is not "
                           "callable: a WSGI app is a callable(environ, start_response)")
    return obj  # type: ignore[no-any-return]


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """A dotted ``pkg.mod:func`` or ``pkg.mod.func`` for hooks."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        module = import_module(module_name, spec)
        obj = _get_attrs(spec, module, attr.split("."))
    else:
        module, rest = _import_longest(spec)
        if not rest:
            raise AppLoadError(f"{what} {spec}: names a module, not a callable")
        obj = _get_attrs(spec, module, rest)
    if not callable(obj):
        raise AppLoadError(f"{what} {spec}: is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]
