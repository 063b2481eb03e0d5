"""I/O around chaussette's sans-I/O protocol cores (``chaussette.protocols``).

The per-connection logic of each protocol is written once, in blocking style
(``fastcgi.py``, ``scgi.py``): read, feed the core, act on its events, write under a
per-connection lock. It runs on an ``Engine`` (``engine.py``) that provides tasks, locks,
flags and an accept loop: OS threads (``threads.py``), gevent (``gevent.py``) or eventlet
(``eventlet.py``). ``server.py`` is the ``Server`` the lifecycle drives; each engine module
exposes its ``FastCGIServer`` and ``SCGIServer``, named in the backend registry.
"""
