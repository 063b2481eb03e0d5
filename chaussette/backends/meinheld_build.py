"""Build meinheld 1.0.2 right for greenlet 3 and install it into this Python environment.

    python -m chaussette.backends.meinheld_build [--check] [--force] [--sdist FILE]

The meinheld on PyPI cannot serve safely on today's greenlet: its sdist bundles the header of
greenlet 0.4 and ``greensupport.c`` includes it in quotes, so it wins over the installed one.
Its macros read greenlet struct fields that greenlet >= 2 no longer has, and every write that
would block then switches to garbage: the server spins, every other client stalls, bodies are
cut or get an error page appended, the log says 500.

This tool downloads the 1.0.2 sdist with pip, checks its hash, and fixes it:

- the header of the installed greenlet replaces ``meinheld/server/greenlet.h``;
- ``greenlet_getparent`` drops the new reference greenlet >= 2 hands out (meinheld borrows
  it: one leaked reference per blocked write otherwise);
- ``greenlet_setparent`` returns the int greenlet returns, not a pointer (a hard error on
  GCC >= 14);
- ``<sys/uio.h>`` is included for ``writev``;
- two bugs of meinheld's own that a production server cannot keep: a failed ``accept()``
  (EMFILE, a connection aborted before it was accepted) stopped the server for good, and every
  client's REMOTE_ADDR pointed into ``inet_ntoa``'s static buffer, so a keep-alive request
  reported the address of whoever connected last (IPv6 peers read as 0.0.0.0);
- a chunked request body with a trailer crashed the server (a NULL header name): trailers
  are ignored;
- every descriptor was added to epoll with EPOLLEXCLUSIVE, which EPOLL_CTL_MOD refuses: a
  connection first watched for reading could never be watched for writing, so a response
  that filled the socket buffer on it (a large one on a keep-alive connection, a file over a
  unix socket) stalled until meinheld's 300 s write timeout;
- the next request on a keep-alive connection had to arrive whole within the keep-alive
  timeout (a slower upload was cut): it gets the 30 s allowed between two reads that a
  first request gets;
- a stop left the listening socket in epoll (picoev forgets a descriptor when it is closed,
  and the listening socket is not: it belongs to the process manager);
- the app's ``close()`` was called with the exception that cut the response still set (a
  SystemError in any close() written in Python): it is kept aside meanwhile;
- Python 3.13 compatibility: ``PyEval_CallObject*`` and ``Py_TRASHCAN_SAFE_*`` are gone;
- the version gets a local label, ``1.0.2+chaussette1.greenlet3``, so that the backend can
  tell this build from the PyPI one, and the metadata asks for the greenlet it was built for.

It then installs the result with ``pip install --no-deps --no-cache-dir`` (pip's wheel cache
could otherwise hand back an unpatched build of the same version). CFLAGS is never set: set,
it replaces Python's ``-O3 -DNDEBUG`` and an assert meinheld leaves in aborts the server; so
that a CFLAGS the user has set cannot do that either, ``-DNDEBUG`` goes into CPPFLAGS.

Run it again and it says the right build is already there. Exit codes: 0 done (or nothing to
do), 1 the build failed, 2 bad arguments; ``--check`` exits 1 when the build is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

MEINHELD_VERSION = "1.0.2"
SDIST_NAME = f"meinheld-{MEINHELD_VERSION}.tar.gz"
SDIST_SHA256 = "008c76937ac2117cc69e032dc69cea9f85fc605de9bac1417f447c41c16a56d6"
# Bump when the fixes below change: older builds are then refused and rebuilt.
REVISION = 1
LOCAL_PREFIX = "chaussette"
MIN_GREENLET = 3  # the major version the fix was proven with
COMMAND = "python -m chaussette.backends.meinheld_build"

_NETWORK_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Max retries exceeded",
    "ProxyError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Could not fetch URL",
    "Network is unreachable",
    "No matching distribution found",
)


class BuildError(Exception):
    """The build cannot go on; the message is one line for the user."""


# -- what is installed ------------------------------------------------------------------------


def greenlet_version() -> str | None:
    try:
        return importlib.metadata.version("greenlet")
    except importlib.metadata.PackageNotFoundError:
        return None


def meinheld_version() -> str | None:
    try:
        return importlib.metadata.version("meinheld")
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version: str) -> int:
    match = re.match(r"\d+", version)
    return int(match.group()) if match else 0


def build_version(greenlet: str) -> str:
    """The version our build of meinheld carries when built against ``greenlet``."""
    return f"{MEINHELD_VERSION}+{LOCAL_PREFIX}{REVISION}.greenlet{_major(greenlet)}"


def build_problem() -> str | None:
    """Why the installed meinheld must not be used, or None when it is our current build
    for the installed greenlet. Reads metadata only: meinheld is not imported."""
    installed = meinheld_version()
    if installed is None:
        return f"meinheld is not installed; run: {COMMAND}"
    greenlet = greenlet_version()
    if greenlet is None:
        return f"greenlet is not installed; run: pip install 'chaussette[meinheld]' && {COMMAND}"
    public, _, local = installed.partition("+")
    match = re.fullmatch(rf"{LOCAL_PREFIX}(\d+)\.greenlet(\d+)", local)
    if not local:
        return (
            f"the installed meinheld {installed} is the PyPI build, broken on greenlet 3 "
            f"(slow clients stall everyone and corrupt bodies); run: {COMMAND}"
        )
    if match is None or public != MEINHELD_VERSION:
        return f"the installed meinheld {installed} is not chaussette's build; run: {COMMAND}"
    revision, built_for = int(match.group(1)), int(match.group(2))
    if revision != REVISION:
        return (
            f"the installed meinheld {installed} is chaussette's build revision {revision}, "
            f"this chaussette needs revision {REVISION}; run: {COMMAND}"
        )
    if built_for != _major(greenlet):
        return (
            f"the installed meinheld {installed} was built for greenlet {built_for} "
            f"and greenlet {greenlet} is installed; run: {COMMAND}"
        )
    return None


# -- preflight --------------------------------------------------------------------------------


def _greenlet_header() -> Path:
    greenlet = greenlet_version()
    if greenlet is None:
        raise BuildError("greenlet is not installed: pip install 'chaussette[meinheld]' first")
    if _major(greenlet) < MIN_GREENLET:
        raise BuildError(
            f"greenlet {greenlet} is installed; this build needs greenlet >= {MIN_GREENLET}: "
            "pip install -U 'chaussette[meinheld]'"
        )
    spec = importlib.util.find_spec("greenlet")
    if spec is None or spec.origin is None:
        raise BuildError("greenlet's metadata is installed but not its package")
    header = Path(spec.origin).parent / "greenlet.h"
    if not header.is_file():
        raise BuildError(f"greenlet {greenlet} installed no C header ({header} is missing)")
    return header


def _preflight() -> None:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = shlex.split(cc)[0] if cc.strip() else "cc"
    if shutil.which(compiler) is None:
        raise BuildError(f"no C compiler: {compiler!r} not found (Debian: apt-get install gcc)")
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        raise BuildError(
            f"no Python headers: {include / 'Python.h'} is missing "
            f"(Debian: apt-get install python3-dev)"
        )
    if importlib.util.find_spec("pip") is None:
        raise BuildError(f"pip is not available to {sys.executable}: {sys.executable} -m ensurepip")


# -- steps ------------------------------------------------------------------------------------


def _pip(args: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    command = [
        sys.executable,
        "-m",
        "pip",
        *args,
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
    ]
    with open(log, "ab") as out:
        out.write(("$ " + shlex.join(command) + "\n").encode())
        out.flush()
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        ).returncode


def _keep_log(log: Path) -> Path:
    fd, kept = tempfile.mkstemp(prefix="chaussette-meinheld-build-", suffix=".log")
    os.close(fd)
    shutil.copyfile(log, kept)
    return Path(kept)


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror:", line) and not line.startswith("error: subprocess-exited"):
            return line
    return lines[-1] if lines else "(no output)"


def download(dest: Path, log: Path) -> Path:
    code = _pip(
        [
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"meinheld=={MEINHELD_VERSION}",
            "-d",
            str(dest),
        ],
        log,
    )
    sdist = dest / SDIST_NAME
    if code != 0 or not sdist.is_file():
        text = log.read_text(errors="replace")
        kept = _keep_log(log)
        if any(sign in text for sign in _NETWORK_SIGNS):
            raise BuildError(
                f"cannot download meinheld {MEINHELD_VERSION} from the package index "
                f"(no network?); download {SDIST_NAME} elsewhere and pass --sdist FILE "
                f"(pip's output: {kept})"
            )
        raise BuildError(f"pip download failed: {_last_error(text)} (pip's output: {kept})")
    return sdist


def check_sdist(sdist: Path) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise BuildError(
            f"{sdist} is not the meinheld {MEINHELD_VERSION} sdist published on PyPI "
            f"(sha256 {digest}, expected {SDIST_SHA256})"
        )


def unpack(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.10.12: the hash check above vouches for the members
            tar.extractall(dest)
    source = dest / f"meinheld-{MEINHELD_VERSION}"
    if not (source / "setup.py").is_file():
        raise BuildError(f"{sdist} does not unpack to meinheld-{MEINHELD_VERSION}/setup.py")
    return source


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise BuildError(f"{path.name} in the sdist is not the one this fix was written for")
    path.write_text(text.replace(old, new))


_GETPARENT_OLD = """\
PyObject *greenlet_getparent(PyObject *g) {
  import_greenlet();
  return (PyObject *)PyGreenlet_GET_PARENT((PyGreenlet *)g);
}
"""
_GETPARENT_NEW = """\
PyObject *greenlet_getparent(PyObject *g) {
  PyObject *parent;
  import_greenlet();
  /* chaussette: greenlet >= 2 returns a new reference and every caller here
     borrows it. A greenlet holds a reference to its parent, so ours can go. */
  parent = (PyObject *)PyGreenlet_GetParent((PyGreenlet *)g);
  Py_XDECREF(parent);
  return parent;
}
"""
_SETPARENT_C = "PyObject *greenlet_setparent(PyObject *g, PyObject *parent) {"
_SETPARENT_H = "PyObject *greenlet_setparent(PyObject *g, PyObject *parent);"

_ADDR_DECL_OLD = """\
  struct sockaddr_in client_addr;
  char *remote_addr;
  uint32_t remote_port;
"""
_ADDR_DECL_NEW = """\
  struct sockaddr_storage client_addr;
  char remote_addr[INET6_ADDRSTRLEN];
  uint32_t remote_port;
"""
_ADDR_LOOP_OLD = """\
    for (i = 0; i < 8; ++i) {
#if linux"""
_ADDR_LOOP_NEW = """\
    for (i = 0; i < 8; ++i) {
      client_len = sizeof(client_addr);
#if linux"""
_ADDR_OLD = """\
        remote_addr = inet_ntoa(client_addr.sin_addr);
        remote_port = ntohs(client_addr.sin_port);
"""
_ADDR_NEW = """\
        /* chaussette: IPv6 peers too, and unix ones (no address) */
        remote_addr[0] = '\\0';
        remote_port = 0;
        if (client_addr.ss_family == AF_INET) {
          struct sockaddr_in *in4 = (struct sockaddr_in *)&client_addr;
          inet_ntop(AF_INET, &in4->sin_addr, remote_addr, sizeof(remote_addr));
          remote_port = ntohs(in4->sin_port);
        } else if (client_addr.ss_family == AF_INET6) {
          struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&client_addr;
          inet_ntop(AF_INET6, &in6->sin6_addr, remote_addr, sizeof(remote_addr));
          remote_port = ntohs(in6->sin6_port);
        }
"""
_ACCEPT_OLD = """\
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
          PyErr_SetFromErrno(PyExc_IOError);
          /* write_error_log(__FILE__, __LINE__); */
          call_error_logger();
          // die
          kill_server(0);
        }
        break;
"""
_ACCEPT_NEW = """\
        /* chaussette: out of descriptors or memory, or a connection aborted
           before it was accepted, must not stop the server for good. */
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
            errno != ECONNABORTED && errno != EPROTO && errno != EPERM &&
            errno != EMFILE && errno != ENFILE && errno != ENOBUFS &&
            errno != ENOMEM) {
          PyErr_SetFromErrno(PyExc_IOError);
          /* write_error_log(__FILE__, __LINE__); */
          call_error_logger();
          // die
          kill_server(0);
        }
        break;
"""


_TIMER_CALL = """\
#include "timer.h"
"""
_TIMER_CALL_NEW = """\
#include "timer.h"

/* chaussette: PyEval_CallObjectWithKeywords is gone in Python 3.13 */
static PyObject *call_with_keywords(PyObject *func, PyObject *args,
                                    PyObject *kwargs) {
  PyObject *empty, *res;
  if (args != NULL) {
    return PyObject_Call(func, args, kwargs);
  }
  empty = PyTuple_New(0);
  if (empty == NULL) {
    return NULL;
  }
  res = PyObject_Call(func, empty, kwargs);
  Py_DECREF(empty);
  return res;
}
"""


_TRAILER_FIELD = """\
static int header_field_cb(http_parser *p, const char *buf, size_t len) {
  request *req = get_current_request(p);
"""
_TRAILER_VALUE = """\
static int header_value_cb(http_parser *p, const char *buf, size_t len) {
  request *req = get_current_request(p);
"""
_IGNORE_TRAILER = """\
  if (p->flags & F_TRAILING) {
    /* chaussette: the trailer of a chunked body is ignored: its first field
       was added as a header whose name and value were already gone (a crash) */
    return 0;
  }
"""


_CLOSE_DEF = "response_status close_response(client_t *client) {"
_CLOSE_NEXT = "static response_status process_sendfile(client_t *client) {"
_CLOSE_WRAPPER = """\
/* chaussette: the app's close() was called with the error that cut the
   response still set, which Python forbids (SystemError); the error is now
   kept aside meanwhile, and one close() raises is logged as well. */
response_status close_response(client_t *client) {
  PyObject *type, *value, *traceback;
  response_status status;

  PyErr_Fetch(&type, &value, &traceback);
  status = close_response_keeping_error(client);
  if (type != NULL) {
    if (PyErr_Occurred()) {
      call_error_logger();
    }
    PyErr_Restore(type, value, traceback);
  }
  return status;
}

"""


def _edit_all(path: Path, old: str, new: str, count: int) -> None:
    text = path.read_text()
    if text.count(old) != count:
        raise BuildError(f"{path.name} in the sdist is not the one this fix was written for")
    path.write_text(text.replace(old, new))


def apply_fixes(source: Path, header: Path, version: str, greenlet_major: int) -> None:
    """Our fix for greenlet >= 2, applied to the unpacked 1.0.2 sdist."""
    server = source / "meinheld" / "server"
    shutil.copyfile(header, server / "greenlet.h")
    _edit(server / "greensupport.c", _GETPARENT_OLD, _GETPARENT_NEW)
    _edit(
        server / "greensupport.c",
        _SETPARENT_C,
        "int greenlet_setparent(PyObject *g, PyObject *parent) {",
    )
    _edit(
        server / "greensupport.h",
        _SETPARENT_H,
        "int greenlet_setparent(PyObject *g, PyObject *parent);",
    )
    _edit(
        server / "meinheld.h",
        "#include <sys/types.h>\n",
        "#include <sys/types.h>\n#include <sys/uio.h> /* chaussette: writev */\n",
    )
    _edit(server / "server.c", _ACCEPT_OLD, _ACCEPT_NEW)
    # Each client keeps its own copy of its address: it pointed into inet_ntoa's static
    # buffer, so every request reported the address of the last client accepted.
    _edit(server / "client.h", "  char *remote_addr;\n", "  char remote_addr[INET6_ADDRSTRLEN];\n")
    _edit(
        server / "server.c",
        "  client->remote_addr = remote_addr;\n",
        '  snprintf(client->remote_addr, sizeof(client->remote_addr), "%s", remote_addr);\n',
    )
    _edit(server / "server.c", _ADDR_DECL_OLD, _ADDR_DECL_NEW)
    _edit(server / "server.c", _ADDR_LOOP_OLD, _ADDR_LOOP_NEW)
    _edit(server / "server.c", _ADDR_OLD, _ADDR_NEW)
    _edit(
        server / "response.c",
        _CLOSE_DEF,
        "static response_status close_response_keeping_error(client_t *client) {",
    )
    _edit(server / "response.c", _CLOSE_NEXT, _CLOSE_WRAPPER + _CLOSE_NEXT)
    parser = server / "http_request_parser.c"
    _edit(parser, _TRAILER_FIELD, _TRAILER_FIELD + _IGNORE_TRAILER)
    _edit(parser, _TRAILER_VALUE, _TRAILER_VALUE + _IGNORE_TRAILER)
    # EPOLL_CTL_MOD fails (EINVAL) on a descriptor added with EPOLLEXCLUSIVE: a connection
    # first watched for reading could then never be watched for writing, and a response
    # that filled the socket buffer (a file over a unix socket, anything large on a
    # keep-alive connection) stalled for good.
    _edit_all(
        server / "picoev_epoll.c",
        "      ev.events |= EPOLLEXCLUSIVE;\n",
        "      /* chaussette: no EPOLLEXCLUSIVE, EPOLL_CTL_MOD refuses it */\n",
        2,
    )
    # The next request on a keep-alive connection had to arrive whole within the keep-alive
    # timeout (5 s): the 30 s allowed between two reads applied to first requests only.
    _edit(
        server / "server.c",
        "  if (!client->keep_alive) {\n    picoev_set_timeout(loop, fd, READ_TIMEOUT_SECS);\n  }\n",
        "  /* chaussette: on keep-alive connections too */\n"
        "  picoev_set_timeout(loop, fd, READ_TIMEOUT_SECS);\n",
    )
    # picoev only forgets a descriptor in epoll when it is closed; the stop must stop watching
    # the listening socket now (it stays open: a manager or a re-exec still needs it).
    _edit(
        server / "server.c",
        "      if (!picoev_del(main_loop, listen_sock)) {\n",
        "      /* chaussette: out of epoll now, not when it is closed */\n"
        "      picoev_update_events_internal(main_loop, listen_sock, 0);\n"
        "      if (!picoev_del(main_loop, listen_sock)) {\n",
    )
    # Python 3.13 removed PyEval_CallObject* and Py_TRASHCAN_SAFE_*.
    _edit_all(server / "response.c", "PyEval_CallObject(", "PyObject_CallObject(", 2)
    _edit(server / "timer.c", _TIMER_CALL, _TIMER_CALL_NEW)
    _edit(server / "timer.c", "PyEval_CallObjectWithKeywords(", "call_with_keywords(")
    _edit(
        server / "timer.c",
        "Py_TRASHCAN_SAFE_BEGIN(self);",
        "Py_TRASHCAN_BEGIN(self, TimerObject_dealloc);",
    )
    _edit(server / "timer.c", "Py_TRASHCAN_SAFE_END(self);", "Py_TRASHCAN_END;")
    _edit(source / "setup.py", f'version="{MEINHELD_VERSION}",', f'version="{version}",')
    _edit(
        source / "setup.py",
        "install_requires=['greenlet>=0.4.5,<0.5']",
        f"install_requires=['greenlet>={greenlet_major},<{greenlet_major + 1}']",
    )


def install(source: Path, log: Path, force: bool, isolation: bool) -> None:
    args = ["install", "--no-deps", "--no-cache-dir"]
    if force:
        args.append("--force-reinstall")
    if not isolation:
        args.append("--no-build-isolation")
    # A CFLAGS in the environment replaces Python's own flags, -DNDEBUG with them, and an
    # assert meinheld leaves in then aborts the server: asserts stay off whatever CFLAGS is.
    env = dict(os.environ)
    env["CPPFLAGS"] = " ".join(filter(None, ["-DNDEBUG", env.get("CPPFLAGS")]))
    code = _pip([*args, str(source)], log, env)
    if code == 0:
        return
    text = log.read_text(errors="replace")
    kept = _keep_log(log)
    if "Python.h: No such file" in text:
        raise BuildError(f"no Python headers (Debian: apt-get install python3-dev); log: {kept}")
    if re.search(r"command '[^']*' failed: No such file", text) or "unable to execute" in text:
        raise BuildError(f"no C compiler (Debian: apt-get install gcc); log: {kept}")
    if any(sign in text for sign in _NETWORK_SIGNS):
        raise BuildError(
            "pip could not fetch setuptools for the build (no network?); "
            f"install setuptools and pass --no-build-isolation; log: {kept}"
        )
    raise BuildError(f"building meinheld failed: {_last_error(text)}; log: {kept}")


def verify(version: str) -> None:
    """Import the installed build in a fresh interpreter and read its version."""
    probe = (
        "import importlib.metadata as m, meinheld.server; "
        "print(m.version('meinheld'), meinheld.server.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"the installed build does not import: {_last_error(done.stderr)}")
    found = done.stdout.split()[0] if done.stdout.split() else "?"
    if found != version:
        raise BuildError(f"pip installed meinheld {found}, not {version}")


# -- command line -----------------------------------------------------------------------------


def build(sdist: Path | None, force: bool, isolation: bool, keep: Path | None) -> str:
    header = _greenlet_header()
    greenlet = greenlet_version() or "0"
    version = build_version(greenlet)
    _preflight()
    with tempfile.TemporaryDirectory(prefix="chaussette-meinheld-") as tmp_name:
        tmp = Path(tmp_name)
        log = tmp / "pip.log"
        if sdist is None:
            print(f"downloading meinheld {MEINHELD_VERSION} (sdist) with pip", flush=True)
            sdist = download(tmp / "dist", log)
        check_sdist(sdist)
        source = unpack(sdist, tmp / "src")
        apply_fixes(source, header, version, _major(greenlet))
        if keep is not None:
            shutil.copytree(source, keep, dirs_exist_ok=True)
        print(f"building and installing meinheld {version} for greenlet {greenlet}", flush=True)
        install(source, log, force, isolation)
    verify(version)
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description=(
            f"Build meinheld {MEINHELD_VERSION} with chaussette's fix for greenlet 3 and "
            "install it into this Python environment."
        ),
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only say whether the right build is installed (exit 0) or not (exit 1)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if it is installed")
    parser.add_argument(
        "--sdist",
        type=Path,
        metavar="FILE",
        help=f"use this {SDIST_NAME} instead of downloading it (its hash is checked)",
    )
    parser.add_argument(
        "--no-build-isolation",
        dest="isolation",
        action="store_false",
        help="build with the setuptools of this environment (offline builds)",
    )
    parser.add_argument(
        "--keep-source", type=Path, metavar="DIR", help="also copy the fixed source tree to DIR"
    )
    args = parser.parse_args(argv)
    problem = build_problem()
    if args.check:
        print(problem or f"meinheld {meinheld_version()} (chaussette's build) is installed")
        return 1 if problem else 0
    if problem is None and not args.force:
        print(
            f"meinheld {meinheld_version()} (chaussette's build) is already installed "
            f"in {sys.prefix}; nothing to do"
        )
        return 0
    started = time.monotonic()
    try:
        version = build(args.sdist, args.force, args.isolation, args.keep_source)
    except BuildError as exc:
        print(f"meinheld_build: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"meinheld_build: error: {exc}", file=sys.stderr)
        return 1
    print(f"installed meinheld {version} in {sys.prefix} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
