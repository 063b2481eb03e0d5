"""The app of the lifecycle tests: slow requests that say when they have started.

/                 "life <pid>"
/slow?s=N&marker=PATH   writes PATH (if given) as soon as the request runs, sleeps N
                  seconds, then answers "slow done <pid>" with a Content-Length
/error            raises before start_response
"""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/slow":
        marker = query.get("marker")
        if marker:
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(float(query.get("s", "1")))
        body = f"slow done {os.getpid()}".encode()
    elif path == "/error":
        raise RuntimeError("life_app /error")
    elif path == "/":
        body = f"life {os.getpid()}".encode()
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
        return [b"not found"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
