"""Listen spec -> listening socket, and who owns what.

Three ways to a listener, in this order:

1. a re-exec of ourselves (SIGHUP, reloader) hands the same fd over in the environment;
2. an inherited fd: ``--fd N``, ``--host fd://N`` or systemd's ``LISTEN_FDS``;
3. a socket we bind: TCP (v4/v6) with SO_REUSEADDR, or a unix socket.

An inherited fd is adopted with ``socket.socket(fileno=N)``, which reads the real family and
type from the kernel; it is then checked to be a listening stream socket. We never guess a
family.

A unix socket path is removed at exit only if we created it and the file there is still the
one we created (same device and inode). A stale path is replaced only if it is a socket
nobody listens on; anything else there is an error and is never deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass

from chaussette import systemd
from chaussette.errors import SocketError
from chaussette.settings import Settings

log = logging.getLogger("chaussette")

REEXEC_FD = "CHAUSSETTE_REEXEC_FD"
REEXEC_PID = "CHAUSSETTE_REEXEC_PID"
REEXEC_OWNED = "CHAUSSETTE_REEXEC_OWNED"  # "dev:ino:path" of a unix socket file we own


@dataclass
class Listener:
    sock: socket.socket
    origin: str  # "bound", "from --fd N", "from --host fd://N", "systemd", "re-exec"
    owned_path: str | None = None  # a unix socket file we created
    owned_id: tuple[int, int] | None = None  # its (st_dev, st_ino)

    @property
    def family(self) -> socket.AddressFamily:
        return self.sock.family

    @property
    def is_unix(self) -> bool:
        return self.sock.family == socket.AF_UNIX

    def describe(self, protocol: str = "http") -> str:
        """Where we listen, as a URL of ``protocol`` (``http://127.0.0.1:8080``,
        ``fastcgi://[::1]:9000``) or ``unix:/path``, with the fd and where it came from."""
        name = self.sock.getsockname()
        if self.is_unix:
            where = f"unix:{_unix_name(name)}"
        elif self.sock.family == socket.AF_INET6:
            where = f"{protocol}://[{name[0]}]:{name[1]}"
        else:
            where = f"{protocol}://{name[0]}:{name[1]}"
        fd = self.sock.fileno()
        return f"{where} (fd {fd}, {self.origin})"

    def unix_path(self) -> str | None:
        if not self.is_unix:
            return None
        name = self.sock.getsockname()
        return name if isinstance(name, str) and name else None

    def close(self) -> None:
        """Remove the file we created, if still ours, then close our copy of the socket.

        In that order: while our socket is bound its inode stays allocated, so no newcomer's
        socket file can have reused its number when we compare (st_dev, st_ino).
        """
        path, ident = self.owned_path, self.owned_id
        self.owned_path = self.owned_id = None
        try:
            if path and ident:
                remove_if_ours(path, ident)
        finally:
            self.sock.close()

    def hand_over(self) -> None:
        """Prepare the fd (and ownership of a unix file) for a re-exec of this process."""
        fd = self.sock.fileno()
        os.set_inheritable(fd, True)
        os.environ[REEXEC_FD] = str(fd)
        os.environ[REEXEC_PID] = str(os.getpid())
        if self.owned_path and self.owned_id:
            dev, ino = self.owned_id
            os.environ[REEXEC_OWNED] = f"{dev}:{ino}:{self.owned_path}"


class Outbound(Listener):
    """No listening socket: the protocol's handler connects out to its server (Mongrel2 over
    ZeroMQ). Nothing to hand over on a re-exec and nothing to close: the new image connects
    again."""

    def __init__(self, where: str) -> None:  # the dataclass fields, without a socket
        self.origin = "connecting out"
        self.where = where
        self.owned_path = None
        self.owned_id = None

    @property
    def is_unix(self) -> bool:
        return False

    def describe(self, protocol: str = "http") -> str:
        return f"{self.where} ({self.origin})"

    def unix_path(self) -> str | None:
        return None

    def close(self) -> None:
        return

    def hand_over(self) -> None:
        return


def outbound(settings: Settings) -> Outbound:
    """The stand-in listener of a protocol that listens on nothing (``--zeromq``)."""
    if settings.zeromq:
        return Outbound(f"{settings.protocol} --zeromq {settings.zeromq}")
    return Outbound(f"{settings.protocol} --m2-config {settings.m2_config}")


def _unix_name(name: str | bytes) -> str:
    if isinstance(name, bytes):  # the abstract namespace: shown as @name, like ss(8) does
        return "@" + name[1:].decode(errors="backslashreplace") if name else "(unnamed)"
    return name or "(unnamed)"


def remove_if_ours(path: str, ident: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != ident or not stat.S_ISSOCK(st.st_mode):
        log.info("not removing %s: it is no longer the socket we created", path)
        return
    os.unlink(path)


def get_listener(settings: Settings) -> Listener:
    """The listening socket these settings ask for."""
    handed = _from_reexec()
    if handed is not None:
        return handed
    host = settings.host
    if settings.fd is not None:
        return Listener(adopt_fd(settings.fd, f"--fd {settings.fd}"), f"from --fd {settings.fd}")
    if host.startswith("fd://"):
        return Listener(adopt_fd(_parse_fd_url(host), f"--host {host}"), f"from --host {host}")
    activated = systemd.listen_fds()
    if activated:
        if settings.explicit & {"host", "port"}:
            raise SocketError(
                "systemd passed a socket (LISTEN_FDS) and --host/--port ask for a new one: "
                "drop --host/--port, or run without socket activation"
            )
        if len(activated) > 1:
            log.warning(
                "systemd passed %d sockets; serving on the first (fd %d)",
                len(activated),
                activated[0],
            )
        return Listener(adopt_fd(activated[0], f"LISTEN_FDS fd {activated[0]}"), "systemd")
    if host.startswith("unix:"):
        return bind_unix(host[len("unix:") :], settings.backlog, settings.socket_mode)
    return bind_tcp(host, settings.port, settings.backlog, settings.address_family)


def _parse_fd_url(host: str) -> int:
    text = host[len("fd://") :]
    if not text.isdigit():
        raise SocketError(f"--host {host}: expected fd://N with N a file descriptor number")
    return int(text)


def _from_reexec() -> Listener | None:
    fd_text = os.environ.pop(REEXEC_FD, None)
    pid_text = os.environ.pop(REEXEC_PID, None)
    owned = os.environ.pop(REEXEC_OWNED, None)
    if fd_text is None or pid_text != str(os.getpid()):
        return None  # not ours: a child of a re-exec'd chaussette must not take it
    fd = int(fd_text)
    sock = adopt_fd(fd, f"re-exec fd {fd}")
    listener = Listener(sock, "re-exec")
    if owned:
        dev, ino, path = owned.split(":", 2)
        listener.owned_path, listener.owned_id = path, (int(dev), int(ino))
    return listener


def adopt_fd(fd: int, what: str) -> socket.socket:
    """Take over an inherited listening stream socket; refuse anything else in one line.

    A refused fd is left exactly as it was found: not closed, not shut down, same flags.
    """
    closed = (
        f"{what}: not an open file descriptor (is the process manager passing "
        "the socket, e.g. Circus use_sockets = True?)"
    )
    try:
        st = os.fstat(fd)
    except OverflowError:  # larger than any fd number can be
        raise SocketError(closed) from None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise SocketError(closed) from None
        raise SocketError(f"{what}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(
            f"{what}: not a socket (is the process manager passing "
            "the socket, e.g. Circus use_sockets = True?)"
        )
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:  # a socket the kernel will not describe (family, type)
        raise SocketError(f"{what}: cannot use this socket ({exc.strerror})") from None
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if kind != socket.SOCK_STREAM:
            raise SocketError(
                f"{what}: not a stream socket (type {_type_name(kind)}); HTTP needs SOCK_STREAM"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise SocketError(
                f"{what}: the socket is not listening "
                "(the process manager must bind and listen() before passing it)"
            )
    except BaseException:
        sock.detach()  # not ours to close: leave the fd as we found it
        raise
    if fd <= 2:
        sock = _off_stdio(sock)
    sock.set_inheritable(False)
    return sock


def _off_stdio(sock: socket.socket) -> socket.socket:
    """Move a socket passed as fd 0-2 (Supervisor's fcgi-program uses fd 0) to a new fd.

    Left on fd 0 with close-on-exec, every program the application runs would start with
    no stdin, and the next file it opens would land there; left inheritable, the
    listening socket would leak into them. /dev/null takes its place instead.
    """
    fd = sock.detach()
    moved = os.dup(fd)  # a new fd >= 3, close-on-exec
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)  # closes our copy of the socket on fd; stdio stays inheritable
    finally:
        os.close(null)
    return socket.socket(fileno=moved)


def _type_name(kind: int) -> str:
    for name in ("SOCK_DGRAM", "SOCK_RAW", "SOCK_SEQPACKET", "SOCK_RDM"):
        if getattr(socket, name, None) == kind:
            return name
    return str(kind)


def split_host(host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def bind_tcp(host: str, port: int, backlog: int, family_name: str | None) -> Listener:
    family = {"AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}.get(
        family_name or "", socket.AF_UNSPEC
    )
    bare = split_host(host)
    try:
        infos = socket.getaddrinfo(
            bare or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise SocketError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    last: OSError | None = None
    for fam, kind, proto, _, addr in infos:
        try:
            sock = socket.socket(fam, kind, proto)
        except OSError as exc:  # e.g. IPv6 disabled in this kernel
            last = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return Listener(sock, "bound")
    assert last is not None
    where = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
    raise SocketError(f"cannot bind {where}: {last.strerror}") from None


def bind_unix(path: str, backlog: int, mode: int | None) -> Listener:
    if not path:
        raise SocketError("--host unix: needs a path, e.g. unix:/run/app.sock")
    if len(os.fsencode(path)) >= 108:
        raise SocketError(f"unix socket path too long (max 107 bytes): {path}")
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot bind unix:{path}: {exc.strerror}") from None
    # From here the file is ours: absolute, so that a chdir by the app or a re-exec does
    # not make us look for it elsewhere at exit.
    owned = os.path.abspath(path)
    st = os.lstat(owned)
    ident = (st.st_dev, st.st_ino)
    try:
        if mode is not None:
            os.chmod(owned, mode)
        sock.listen(backlog)
    except OSError as exc:
        remove_if_ours(owned, ident)  # before close(), as in Listener.close
        sock.close()
        raise SocketError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    return Listener(sock, "bound", owned_path=owned, owned_id=ident)


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(
            f"unix:{path}: a file that is not a socket is in the way; "
            "remove it yourself if it is not needed"
        )
    # Non-blocking: a live server with a full listen queue makes a blocking connect wait
    # forever; EAGAIN then says "someone listens" just as a successful connect does.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale unix socket %s (nothing listens on it)", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # someone else cleared it meanwhile
        return
    except BlockingIOError:
        pass  # its listen queue is full: very much alive
    except OSError as exc:
        raise SocketError(
            f"unix:{path}: cannot check the existing socket ({exc.strerror})"
        ) from None
    finally:
        probe.close()
    raise SocketError(f"unix:{path}: another process is listening on it")
