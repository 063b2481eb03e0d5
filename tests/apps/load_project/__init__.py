"""Shaped like a Django project package (a ``wsgi`` submodule with ``application``),
without Django: ``load_project`` and ``load_project.wsgi`` both name that app."""
