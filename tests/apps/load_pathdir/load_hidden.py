"""Importable only when its directory is given with --python-path."""


def application(environ, start_response):
    body = b"load_hidden:application"
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
