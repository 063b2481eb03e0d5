"""CGI parameters from a FastCGI or SCGI peer -> a WSGI environ.

The rules (also in docs/fastcgi.rst):

- the parameters are kept as they came, except the ``HTTP_CONTENT_TYPE`` and
  ``HTTP_CONTENT_LENGTH`` copies nginx adds on a POST (PEP 3333 forbids them); an empty
  ``CONTENT_TYPE`` or ``CONTENT_LENGTH`` means absent, and so does a ``CONTENT_LENGTH``
  that is not a non-negative integer (the body still ends where the protocol says);
- ``PATH_INFO``, when the peer sent none, is derived from ``REQUEST_URI``: its path part,
  percent-decoded, then

  - when ``SCRIPT_NAME`` is a prefix of it at a ``/`` boundary, what follows the prefix;
  - when it equals ``SCRIPT_NAME`` (nginx's stock ``fastcgi_params`` send the whole path as
    ``SCRIPT_NAME``), ``SCRIPT_NAME`` becomes "" and ``PATH_INFO`` the whole path;
  - otherwise ``SCRIPT_NAME`` becomes "" and ``PATH_INFO`` the whole path;

  and "" when there is no ``REQUEST_URI`` either;
- defaults for what a CGI peer should send: ``REQUEST_METHOD`` GET, ``SCRIPT_NAME`` and
  ``QUERY_STRING`` "", ``SERVER_PROTOCOL`` HTTP/1.0, ``SERVER_NAME``/``SERVER_PORT`` from
  ``HTTP_HOST`` (else ``localhost`` and the scheme's port);
- ``wsgi.url_scheme`` is https when ``HTTPS`` is on/1/yes or ``REQUEST_SCHEME`` is https.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes
from wsgiref.util import FileWrapper

from chaussette import __version__

SERVER_SOFTWARE = f"chaussette/{__version__}"
_DROPPED = ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH")
_DEFAULTED = frozenset(
    ("REQUEST_METHOD", "SCRIPT_NAME", "QUERY_STRING", "SERVER_PROTOCOL", "SERVER_SOFTWARE")
)


def base_environ(multithread: bool, multiprocess: bool) -> dict[str, Any]:
    """What every environ of one server starts with."""
    return {
        "wsgi.version": (1, 0),
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
    }


def derive_path_info(environ: dict[str, Any]) -> None:
    """Set PATH_INFO (and maybe SCRIPT_NAME) when the peer sent no PATH_INFO."""
    uri = environ.get("REQUEST_URI")
    if not uri:
        environ["PATH_INFO"] = ""
        return
    path = uri.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = unquote_to_bytes(path.encode("latin-1")).decode("latin-1")
    script = environ.get("SCRIPT_NAME", "").rstrip("/")
    if script and path.startswith(script) and path[len(script) : len(script) + 1] == "/":
        environ["SCRIPT_NAME"] = script
        environ["PATH_INFO"] = path[len(script) :]
    else:
        environ["SCRIPT_NAME"] = ""
        environ["PATH_INFO"] = path


def make_environ(params: dict[str, str], base: dict[str, Any]) -> dict[str, Any]:
    """The environ of a request with these CGI parameters (wsgi.input/errors not set).

    ``params`` becomes the environ (no copy: the protocol core made it for this request);
    the server's ``wsgi.*`` keys win over any parameter of the same name."""
    environ: dict[str, Any] = params
    environ.update(base)
    for name in _DROPPED:
        environ.pop(name, None)
    length = environ.get("CONTENT_LENGTH")
    if length is not None and not (length.isascii() and length.isdigit()):
        del environ["CONTENT_LENGTH"]
        length = None
    if length is None:
        environ["wsgi.input_terminated"] = True  # the protocol ends the body
    if environ.get("CONTENT_TYPE") == "":
        del environ["CONTENT_TYPE"]
    if "PATH_INFO" not in environ:
        derive_path_info(environ)
    if not environ.keys() >= _DEFAULTED:  # a web server sends them all, as a rule
        environ.setdefault("REQUEST_METHOD", "GET")
        environ.setdefault("SCRIPT_NAME", "")
        environ.setdefault("QUERY_STRING", "")
        environ.setdefault("SERVER_PROTOCOL", "HTTP/1.0")
        environ.setdefault("SERVER_SOFTWARE", SERVER_SOFTWARE)
    https = environ.get("HTTPS", "").lower() in ("on", "1", "yes")
    scheme = "https" if https or environ.get("REQUEST_SCHEME") == "https" else "http"
    environ["wsgi.url_scheme"] = scheme
    if "SERVER_NAME" not in environ or "SERVER_PORT" not in environ:
        host = environ.get("HTTP_HOST", "")
        name, port = host, ""
        if host.startswith("["):  # [v6]:port
            end = host.find("]")
            name, port = host[: end + 1], host[end + 2 :]
        elif ":" in host:
            name, port = host.rsplit(":", 1)
        environ.setdefault("SERVER_NAME", name or "localhost")
        environ.setdefault("SERVER_PORT", port or ("443" if scheme == "https" else "80"))
    return environ
