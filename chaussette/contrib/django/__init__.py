"""A Django app adding ``python manage.py runchaussette [options] [ADDR:PORT]``.

Add ``"chaussette.contrib.django"`` to ``INSTALLED_APPS``; the command serves the project's
``WSGI_APPLICATION`` (as ``runserver`` does) through chaussette, with every chaussette option.
"""
