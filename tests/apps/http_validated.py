"""The HTTP test app inside ``wsgiref.validate.validator``: any breach of PEP 3333 by the
server (or the app) raises AssertionError or warns WSGIWarning, and shows in the log."""

from __future__ import annotations

from wsgiref.validate import validator

from tests.apps import http_app

application = validator(http_app.application)
