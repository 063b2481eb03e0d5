"""Mongrel2 devices: small ZeroMQ programs that sit beside Mongrel2 and its handlers.

- ``chaussette.devices.dispatcher``: between Mongrel2 and several handlers, routes each
  request by a rule (sticky per connection, round robin) instead of Mongrel2's plain PUSH.
- ``chaussette.devices.canned``: answers every request with one fixed response whose status,
  headers and body may interpolate values from the request.

Each runs as ``python -m chaussette.devices.NAME --help``. They need pyzmq
(``pip install 'chaussette[mongrel2]'``) and speak the message format of
``chaussette.protocols.mongrel2``.
"""
