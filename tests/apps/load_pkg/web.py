"""Objects for every ``pkg.mod:...`` form of APP."""

from __future__ import annotations

from tests.apps.load_pkg import labelled

app = labelled("web:app")


class Holder:
    wsgi = staticmethod(labelled("web:holder.wsgi"))


holder = Holder()


def create_app(*names: str):
    """Factory taking positional ARGS."""
    return labelled("create_app" + "".join(f" {n}" for n in names))


def make(name: str, *rest: str, debug: bool = False):
    """Factory taking literal arguments from the spec, then ARGS."""
    return labelled(f"make {name} {' '.join(rest)} debug={debug}".replace("  ", " "))


def needs_two(first: str, second: str):
    return labelled(f"needs_two {first} {second}")


def failing_factory():
    settings = {"database": None}
    return labelled(settings["database"].upper())  # AttributeError inside the user's factory


def returns_none():
    return None


NOT_CALLABLE = 42


def paste_factory(global_config: dict, label: str = "paste"):
    """A PasteDeploy ``call:`` app factory."""
    return labelled(label)


def broken_paste_factory(global_config: dict):
    raise LookupError("paste factory: no such database")  # the line the traceback must show
