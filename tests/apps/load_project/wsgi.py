"""The project's WSGI module."""

from __future__ import annotations

from tests.apps.load_pkg import labelled

application = labelled("load_project.wsgi:application")
