"""chaussette: a WSGI server launcher made for process managers."""

__version__ = "2.0.0.dev0"
