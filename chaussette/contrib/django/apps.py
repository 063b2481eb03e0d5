"""The app's configuration: labelled ``chaussette`` (its module name, ``django``, would be
a confusing label)."""

from __future__ import annotations

from django.apps import AppConfig


class ChaussetteConfig(AppConfig):  # type: ignore[misc]  # django is untyped
    name = "chaussette.contrib.django"
    label = "chaussette"
    verbose_name = "chaussette"
