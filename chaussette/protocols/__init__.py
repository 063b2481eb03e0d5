"""Sans-I/O protocol cores: bytes in, events out, bytes back.

Each module here keeps the rules of one wire protocol and nothing else: no sockets, no
threads, no gevent, stdlib only, and no import of the rest of chaussette. The drivers in
``chaussette.drivers`` do the reading, writing and scheduling around them.
"""
