"""mod_wsgi convention in a module: ``application``, no wmain."""

from __future__ import annotations

from tests.apps.load_pkg import labelled

application = labelled("load_module_app:application")
