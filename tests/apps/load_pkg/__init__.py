"""Fixture package for the app-loading tests: each object answers with its own label,
so a test can tell which object chaussette loaded."""

from __future__ import annotations


def labelled(label: str):
    """A WSGI app whose body is ``label``."""
    body = label.encode()

    def app(environ, start_response):
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app
