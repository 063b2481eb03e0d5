# A mod_wsgi script file: the object named ``application`` is the app.
def application(environ, start_response):
    body = b"load_app.wsgi:application"
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
