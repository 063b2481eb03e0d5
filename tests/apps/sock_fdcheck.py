"""Does a listening socket leak into the programs the application runs?

GET /            runs this file as a child with ``close_fds=False`` (every inheritable fd
                 goes along) and answers JSON: the listening sockets open in the server
                 process ("server"), those the child found ("child"), and what the child's
                 fd 0 is ("child_stdin").
GET /?control=1  the same, while the app holds one listening socket it made inheritable on
                 purpose: the child must find it (proof that the check can see a leak).

With SOCK_FDCHECK_CHDIR set, the module changes to that directory when imported (as an app
that daemonizes would), so that a relative unix socket path no longer resolves.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

if os.environ.get("SOCK_FDCHECK_CHDIR"):
    os.chdir(os.environ["SOCK_FDCHECK_CHDIR"])


def listening_sockets() -> list[dict[str, object]]:
    """Every fd of this process that is a listening socket."""
    found: list[dict[str, object]] = []
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:  # the fd listdir itself used, closed by now
            continue
        sock = socket.socket(fileno=fd)
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.append(
                    {"fd": fd, "family": sock.family.name, "name": repr(sock.getsockname())}
                )
        finally:
            sock.detach()
    return found


def stdin_target() -> str | None:
    try:
        return os.readlink("/proc/self/fd/0")
    except OSError:
        return None


def application(environ, start_response):
    control = None
    if "control=1" in environ.get("QUERY_STRING", ""):
        control = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        control.bind(("127.0.0.1", 0))
        control.listen(1)
        control.set_inheritable(True)
    try:
        server = listening_sockets()
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__)],
            close_fds=False,
            stdout=subprocess.PIPE,
            check=True,
            timeout=30,
        )
    finally:
        if control is not None:
            control.close()
    child = json.loads(result.stdout)
    body = json.dumps({"server": server, **child}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


if __name__ == "__main__":
    print(json.dumps({"child": listening_sockets(), "child_stdin": stdin_target()}))
