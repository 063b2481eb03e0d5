"""ashd-wsgi convention: ``wmain(*ARGS)`` returns the app; mod_wsgi's ``application``
is used instead with ``-A``."""

from __future__ import annotations

from tests.apps.load_pkg import labelled

application = labelled("load_wmain:application")


def wmain(*argv: str):
    return labelled("wmain" + "".join(f" {a}" for a in argv))
