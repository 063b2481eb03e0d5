# A mod_wsgi script with a syntax error (a .wsgi file, so that linters leave it alone).
def application(environ, start_response)
    return []
