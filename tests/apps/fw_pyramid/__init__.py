"""A small Pyramid app for tests/test_frameworks.py, loaded through PasteDeploy.

tests/apps/fw_pyramid.ini uses ``call:tests.apps.fw_pyramid:main`` (``egg:`` needs an
installed distribution). ``[app:main]`` and ``[app:other]`` both build this app with
different settings; every answer carries the ``app_name`` setting so a test can tell which
section was loaded.

/hello/{name}              JSON: the matchdict, the greeting setting, app_name
/items/{id:\\d+}/{slug}     JSON: the matchdict, typed, plus request.params
/form                      POST: request.POST as JSON
/where                     JSON: request.application_url, route_url(...), here setting
"""

from __future__ import annotations

from typing import Any

from pyramid.config import Configurator
from pyramid.request import Request


def _base(request: Request) -> dict[str, Any]:
    settings = request.registry.settings
    return {"app_name": settings["app_name"], "greeting": settings["greeting"]}


def hello(request: Request) -> dict[str, Any]:
    name = request.matchdict["name"]
    return {
        **_base(request),
        "matchdict": dict(request.matchdict),
        "message": f"{request.registry.settings['greeting']}, {name}",
    }


def item(request: Request) -> dict[str, Any]:
    return {
        **_base(request),
        "id": int(request.matchdict["id"]),
        "slug": request.matchdict["slug"],
        "params": request.params.mixed(),
    }


def form(request: Request) -> dict[str, Any]:
    return {
        **_base(request),
        "post": request.POST.mixed(),
        "content_length": request.content_length,
    }


def where(request: Request) -> dict[str, Any]:
    return {
        **_base(request),
        "application_url": request.application_url,
        "route_url": request.route_url("item", id=7, slug="seven"),
        "here": request.registry.settings["here_dir"],
    }


def main(global_config: dict[str, Any], **settings: Any) -> Any:
    """The PasteDeploy app factory."""
    with Configurator(settings=settings) as config:
        config.add_route("hello", "/hello/{name}")
        config.add_route("item", r"/items/{id:\d+}/{slug}")
        config.add_route("form", "/form", request_method="POST")
        config.add_route("where", "/where")
        config.add_view(hello, route_name="hello", renderer="json")
        config.add_view(item, route_name="item", renderer="json")
        config.add_view(form, route_name="form", renderer="json")
        config.add_view(where, route_name="where", renderer="json")
        return config.make_wsgi_app()
