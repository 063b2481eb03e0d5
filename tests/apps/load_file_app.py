# Loaded as a file path (tests/apps/load_file_app.py), the mod_wsgi way.
import os


def _app(label):
    body = label.encode()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


application = _app("load_file_app.py:application " + os.path.basename(__file__))
other = _app("load_file_app.py:other")
