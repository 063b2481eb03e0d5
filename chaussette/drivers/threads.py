"""FastCGI and SCGI on OS threads (stdlib only), after ``--request-model``."""

from __future__ import annotations

from chaussette.drivers.engine import ThreadEngine
from chaussette.drivers.fastcgi import FastCGIConnection
from chaussette.drivers.scgi import SCGIConnection
from chaussette.drivers.server import ProtocolServer


class FastCGIServer(ProtocolServer):
    engine_class = ThreadEngine
    protocol = "fastcgi"
    connection = FastCGIConnection
    multiplexing = True


class SCGIServer(ProtocolServer):
    engine_class = ThreadEngine
    protocol = "scgi"
    connection = SCGIConnection
    multiplexing = False
