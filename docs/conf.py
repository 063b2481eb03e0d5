"""Sphinx configuration: stock alabaster, one local extension (docs/_ext)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "_ext"), str(HERE.parent)]

import chaussette  # noqa: E402  (needs the paths above)

project = "chaussette"
author = "the chaussette authors"
copyright = "the chaussette authors"
release = chaussette.__version__
version = ".".join(release.split(".")[:2])

extensions = ["chaussette_docs"]
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_theme_options = {
    "description": "A WSGI server launcher made for process managers",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []
nitpicky = True
smartquotes = False  # "--flag" in prose must stay two hyphens
