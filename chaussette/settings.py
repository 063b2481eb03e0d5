"""The one registry of options.

Every option is declared once, in ``OPTIONS``. The command line (``parse_args``), the
environment (``CHAUSSETTE_<NAME>``), paste ini files (``from_strings``) and the docs' option
reference are all derived from it. Cross-option checks live in ``check``.

Values always arrive as strings from the CLI, the environment and ini files, so each option
carries one converter from ``str``; the Python API (``Settings(**values)``) takes real values.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chaussette.errors import UsageError

HELLO_APP = "chaussette.hello:app"
ENV_PREFIX = "CHAUSSETTE_"


# -- converters: str -> value, raising ValueError with a message that names the problem --


def to_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _to_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"must be at least {minimum}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    return _to_int(text, 0)


def positive_int(text: str) -> int:
    return _to_int(text, 1)


def port_number(text: str) -> int:
    value = _to_int(text, 0)
    if value > 65535:
        raise ValueError(f"a port is 0-65535, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def name_list(text: str) -> list[str]:
    """``"gzip, buffer"`` -> ``["gzip", "buffer"]``."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise ValueError(f"expected comma-separated names, got {text!r}")
    return names


def octal_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError(f"expected an octal file mode like 660, got {text!r}") from None
    if not 0 <= value <= 0o7777:
        raise ValueError(f"expected an octal file mode like 660, got {text!r}")
    return value


def path_list(text: str) -> list[str]:
    return [p for p in text.split(os.pathsep) if p]


def string(text: str) -> str:
    return text


def shell_words(text: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"cannot split {text!r} into words ({exc})") from None


def choice(*values: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in values:
            raise ValueError(f"expected one of {', '.join(values)}; got {text!r}")
        return text

    convert.choices = values  # type: ignore[attr-defined]
    return convert


# -- the registry --


@dataclass(frozen=True)
class Option:
    """One setting. ``name`` is the attribute, the ini key and (upper-cased) the env suffix."""

    name: str
    flags: tuple[str, ...]
    help: str
    section: str
    default: Any = None
    convert: Callable[[str], Any] = string
    metavar: str | None = None
    switch: bool = False  # a flag without a value (store_true)
    positional: bool = False
    cli_only: bool = False  # --version, --backends: not settings of a running server
    many: bool = False  # repeatable flag; values accumulate in a list

    @property
    def env(self) -> str | None:
        if self.cli_only:
            return None
        return ENV_PREFIX + self.name.upper()

    @property
    def choices(self) -> tuple[str, ...] | None:
        return getattr(self.convert, "choices", None)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
FAMILIES = ("AF_INET", "AF_INET6", "AF_UNIX")
SOCKET_TYPES = ("SOCK_STREAM", "SOCK_DGRAM", "SOCK_RAW", "SOCK_RDM", "SOCK_SEQPACKET")

OPTIONS: tuple[Option, ...] = (
    # Application
    Option(
        "app",
        (),
        "The WSGI application: pkg.mod:obj, pkg.mod.obj, pkg.mod:factory(), "
        "a path to a .py/.wsgi file, paste:file.ini[#name], or a Django project's "
        "wsgi or settings module.",
        "Application",
        default=HELLO_APP,
        metavar="APP",
        positional=True,
    ),
    Option(
        "args",
        (),
        "Positional arguments given to a factory call or to wmain(*ARGS). From the "
        "environment or an ini file: one string, split like a shell command line.",
        "Application",
        default=(),
        convert=shell_words,
        metavar="ARGS",
        positional=True,
    ),
    Option(
        "mod_wsgi",
        ("-A", "--mod-wsgi"),
        "Load APP the mod_wsgi way: use the object "
        "named 'application' in the module or file, ignoring any wmain().",
        "Application",
        default=False,
        convert=to_bool,
        switch=True,
    ),
    Option(
        "python_path",
        ("--python-path",),
        "Directories put in front of sys.path before "
        f"the application is imported ('{os.pathsep}'-separated; repeatable).",
        "Application",
        default=(),
        convert=path_list,
        metavar="PATH",
        many=True,
    ),
    Option(
        "pre_hook",
        ("--pre-hook",),
        "A dotted callable called with the settings before "
        "the socket and the application are set up. If it raises, startup stops (exit 1).",
        "Application",
        metavar="CALLABLE",
    ),
    Option(
        "post_hook",
        ("--post-hook",),
        "A dotted callable called with the settings after the server has stopped.",
        "Application",
        metavar="CALLABLE",
    ),
    # Socket
    Option(
        "host",
        ("--host",),
        "Host or address to bind; also unix:/path for a unix socket "
        "and fd://N for an inherited descriptor. IPv6 as [::1].",
        "Socket",
        default="127.0.0.1",
    ),
    Option("port", ("--port",), "TCP port to bind.", "Socket", default=8080, convert=port_number),
    Option(
        "fd",
        ("--fd",),
        "Serve on this inherited listening socket (from Circus, "
        "Supervisor fcgi-program, ...). Family and type are detected.",
        "Socket",
        convert=non_negative_int,
        metavar="N",
    ),
    Option(
        "backlog",
        ("--backlog",),
        "Listen queue size for sockets chaussette binds.",
        "Socket",
        default=2048,
        convert=positive_int,
    ),
    Option(
        "address_family",
        ("--address-family",),
        "Address family of the socket to bind; "
        "detected from --host when omitted. Inherited sockets are always detected.",
        "Socket",
        convert=choice(*FAMILIES),
    ),
    Option(
        "socket_type",
        ("--socket-type",),
        "Socket type; HTTP and the other protocols need SOCK_STREAM, which is the default.",
        "Socket",
        default="SOCK_STREAM",
        convert=choice(*SOCKET_TYPES),
    ),
    Option(
        "socket_mode",
        ("--socket-mode",),
        "File mode (octal) of a unix socket "
        "chaussette binds, e.g. 666 so that an nginx worker can connect.",
        "Socket",
        convert=octal_mode,
        metavar="MODE",
    ),
    # Server
    Option(
        "protocol", ("--protocol",), "Wire protocol spoken on the socket.", "Server", default="http"
    ),
    Option(
        "backend",
        ("--backend",),
        "Server library for http, or concurrency engine for chaussette's own protocols "
        "(threads unless named); see --backends.",
        "Server",
        default="wsgiref",
    ),
    Option(
        "threads",
        ("--threads",),
        "Most requests served at once by a threaded backend (for http, at the bound new "
        "connections wait in the listen queue; fastcgi and scgi bound connections with "
        "--max-conns).",
        "Server",
        default=10,
        convert=positive_int,
        metavar="N",
    ),
    Option(
        "spawn",
        ("--spawn",),
        "Size of the greenlet pool of a gevent/eventlet backend.",
        "Server",
        convert=positive_int,
        metavar="N",
    ),
    Option(
        "no_monkey",
        ("--no-monkey",),
        "Do not monkey-patch the standard library for a greenlet backend.",
        "Server",
        default=False,
        convert=to_bool,
        switch=True,
    ),
    Option(
        "timeout",
        ("--timeout",),
        "Seconds a client may stay silent while sending its "
        "request or reading the response before its connection is closed.",
        "Server",
        default=60.0,
        convert=positive_float,
        metavar="SECONDS",
    ),
    Option(
        "limit_request_line",
        ("--limit-request-line",),
        "Longest request line accepted, in bytes; longer gets 414.",
        "Server",
        default=8190,
        convert=positive_int,
        metavar="BYTES",
    ),
    Option(
        "limit_request_headers",
        ("--limit-request-headers",),
        "Most bytes of request headers accepted; more gets 431.",
        "Server",
        default=65536,
        convert=positive_int,
        metavar="BYTES",
    ),
    Option(
        "middleware",
        ("--middleware",),
        "Wrap the application in WSGI middleware: a short name from chaussette.middleware "
        "(gzip, buffer) or a dotted path to a callable taking the app; comma-separated and "
        "repeatable; the first named is the outermost.",
        "Server",
        many=True,
        default=(),
        convert=name_list,
        metavar="NAME",
    ),
    # FastCGI / SCGI (our own protocol servers)
    Option(
        "max_conns",
        ("--max-conns",),
        "FastCGI/SCGI: most connections served at once (FCGI_MAX_CONNS); "
        "at the bound, new connections wait in the listen queue.",
        "Protocols",
        default=1024,
        convert=positive_int,
        metavar="N",
    ),
    Option(
        "max_reqs",
        ("--max-reqs",),
        "FastCGI: most requests served at once over all connections (FCGI_MAX_REQS); "
        "a request beyond it is answered FCGI_OVERLOADED.",
        "Protocols",
        default=1024,
        convert=positive_int,
        metavar="N",
    ),
    Option(
        "max_params_size",
        ("--max-params-size",),
        "FastCGI/SCGI: most bytes of request parameters (the CGI environment) accepted "
        "for one request; more closes the connection.",
        "Protocols",
        default=65536,
        convert=positive_int,
        metavar="BYTES",
    ),
    Option(
        "request_model",
        ("--request-model",),
        "FastCGI/SCGI on --backend threads: 'free[:max=N,timeout=T]' (a thread per request, "
        "at most N; at the bound no new request is read), 'rplex' (app calls in threads, "
        "responses written by one thread) or 'single' (one request at a time).",
        "Protocols",
        default="free",
        metavar="MODEL",
    ),
    Option(
        "raw_handler",
        ("--raw-handler",),
        "FastCGI/SCGI: APP is a raw request handler, called with a request that has "
        "environ, stdin, stdout and stderr, instead of a WSGI application.",
        "Protocols",
        default=False,
        convert=to_bool,
        switch=True,
    ),
    # Mongrel2 (handlers connect out over ZeroMQ: no listening socket)
    Option(
        "zeromq",
        ("--zeromq",),
        "Mongrel2: the handler's ZeroMQ endpoints, SEND_SPEC[,RECV_SPEC] as in the handler's "
        "send_spec and recv_spec (tcp://host:port or ipc://path; an identity as "
        "tcp://IDENT@host:port). Without RECV_SPEC, the next port down from SEND_SPEC's. "
        "Replaces --host, --port and --fd.",
        "Mongrel2",
        metavar="SEND_SPEC[,RECV_SPEC]",
    ),
    Option(
        "m2_config",
        ("--m2-config",),
        "Mongrel2: read the handler's endpoints from Mongrel2's config database "
        "(config.sqlite, as written by m2sh load) instead of --zeromq.",
        "Mongrel2",
        metavar="PATH",
    ),
    Option(
        "m2_handler",
        ("--m2-handler",),
        "Mongrel2: which handler of --m2-config to serve: its send_ident, a route (/app), "
        "a host and route (example.com/app) or a host name. Needed when the database has "
        "more than one handler.",
        "Mongrel2",
        metavar="SELECTOR",
    ),
    Option(
        "m2_identity",
        ("--m2-identity",),
        "Mongrel2: the ZeroMQ identity of this handler's sockets (one per process).",
        "Mongrel2",
        metavar="IDENT",
    ),
    Option(
        "m2_dispatcher",
        ("--m2-dispatcher",),
        "Mongrel2: take requests from chaussette-dispatcher in credit mode at SPEC (its "
        "--credit endpoint) instead of from Mongrel2's send_spec: it gives this process a "
        "request only when it asked for one, so a restart loses none. Replies still go to "
        "Mongrel2's recv_spec. Threads backend only.",
        "Mongrel2",
        metavar="SPEC",
    ),
    Option(
        "upload_dir",
        ("--upload-dir",),
        "Mongrel2: the only directory async uploads (bodies Mongrel2 spools to a file) are "
        "read from and deleted in. Default with --m2-config: the directory of Mongrel2's "
        "upload.temp_store; without it, uploads are refused with 400 unless this is set.",
        "Mongrel2",
        metavar="PATH",
    ),
    # Processes
    Option(
        "workers",
        ("--workers",),
        "Fork N worker processes after the socket is bound, replace one that dies and stop "
        "them all gracefully on SIGTERM (for running without a process manager).",
        "Processes",
        convert=positive_int,
        metavar="N",
    ),
    # Lifecycle
    Option(
        "graceful_timeout",
        ("--graceful-timeout",),
        "Seconds in-flight requests get to finish after SIGTERM/SIGINT/SIGHUP before they are cut.",
        "Lifecycle",
        default=30.0,
        convert=positive_float,
        metavar="SECONDS",
    ),
    Option(
        "use_reloader",
        ("--use-reloader",),
        "Restart in place when a Python file under "
        "the working directory or --python-path changes (needs watchfiles).",
        "Lifecycle",
        default=False,
        convert=to_bool,
        switch=True,
    ),
    # Logging
    Option(
        "log_level",
        ("--log-level",),
        "Least severe level logged.",
        "Logging",
        default="info",
        convert=choice(*LOG_LEVELS),
    ),
    Option(
        "log_output",
        ("--log-output",),
        "Where the log goes: '-' for stdout or a file path (reopened on SIGUSR1, for logrotate).",
        "Logging",
        default="-",
        metavar="PATH",
    ),
    Option(
        "log_config",
        ("--log-config",),
        "A logging configuration file (.ini for "
        "logging.config.fileConfig, .json for dictConfig); replaces --log-level and "
        "--log-output.",
        "Logging",
        metavar="PATH",
    ),
    Option(
        "access_log",
        ("--access-log",),
        "Log one line per request to this file, or '-' for the main log output. Off by default.",
        "Logging",
        metavar="PATH",
    ),
    # Commands
    Option(
        "version",
        ("--version",),
        "Print the version and exit.",
        "Commands",
        default=False,
        switch=True,
        cli_only=True,
        convert=to_bool,
    ),
    Option(
        "list_backends",
        ("--backends",),
        "Print every backend and protocol pair, installed or not, and exit.",
        "Commands",
        default=False,
        switch=True,
        cli_only=True,
        convert=to_bool,
    ),
)

BY_NAME: dict[str, Option] = {opt.name: opt for opt in OPTIONS}


class Settings:
    """The resolved settings of one chaussette process.

    ``explicit`` names the options the user set (on the command line, in the environment
    or in an ini file), so that checks can tell a chosen value from a default.
    """

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(BY_NAME)
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        self.values: dict[str, Any] = {opt.name: opt.default for opt in OPTIONS}
        self.values.update(values)
        self.explicit: frozenset[str] = frozenset(values)
        if "backend" not in values:
            from chaussette.backends import registry

            self.values["backend"] = registry.default_backend(self.values["protocol"])

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={self.values[k]!r}" for k in sorted(self.explicit))
        return f"Settings({shown})"

    @classmethod
    def from_strings(cls, strings: Mapping[str, str], origin: str = "ini") -> Settings:
        """Settings from string values keyed by option name (paste ini, environment)."""
        values: dict[str, Any] = {}
        for key, text in strings.items():
            name = key.replace("-", "_")
            opt = BY_NAME.get(name)
            if opt is None or opt.cli_only:
                raise UsageError(f"{origin}: unknown setting {key!r}")
            values[name] = _convert(opt, text, f"{origin} {key}")
        return cls(**values)


def _convert(opt: Option, text: str, where: str) -> Any:
    try:
        return opt.convert(text)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and exit
        raise UsageError(f"{message} (see chaussette --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chaussette",
        description="Serve a WSGI application on a socket handed over by a process manager "
        "or bound by chaussette.",
        argument_default=argparse.SUPPRESS,
        epilog="Every option can also be set in the environment as CHAUSSETTE_<NAME> "
        "(e.g. CHAUSSETTE_BACKEND=waitress). Exit codes: 0 clean stop, 1 runtime failure, "
        "2 usage error, 3 the application could not be loaded.",
    )
    groups: dict[str, Any] = {}
    for opt in OPTIONS:
        group = groups.get(opt.section)
        if group is None:
            group = groups[opt.section] = parser.add_argument_group(opt.section)
        if opt.positional:
            nargs = "?" if opt.name == "app" else "*"
            group.add_argument(opt.name, nargs=nargs, metavar=opt.metavar, help=opt.help)
            continue
        help_text = opt.help
        if opt.default not in (None, False, ()):
            help_text += f" Default: {opt.default}."
        if opt.switch:
            group.add_argument(*opt.flags, dest=opt.name, action="store_true", help=help_text)
        else:
            group.add_argument(
                *opt.flags,
                dest=opt.name,
                metavar=opt.metavar or opt.name.upper(),
                action="append" if opt.many else "store",
                choices=opt.choices,
                help=help_text,
            )
    return parser


def parse_args(argv: Iterable[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from a command line, falling back to ``CHAUSSETTE_*`` environment variables."""
    environ = os.environ if environ is None else environ
    namespace = build_parser().parse_intermixed_args(list(argv))
    given = vars(namespace)
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = given.get(opt.name)
        if raw == []:  # no ARGS on the command line: the environment may give them
            raw = None
        if raw is not None:
            if opt.switch or opt.positional:
                values[opt.name] = tuple(raw) if isinstance(raw, list) else raw
            elif opt.many:
                values[opt.name] = [v for text in raw for v in _convert(opt, text, opt.flags[0])]
            else:
                values[opt.name] = _convert(opt, raw, opt.flags[0])
        elif opt.env and opt.env in environ:
            values[opt.name] = _convert(opt, environ[opt.env], opt.env)
    return Settings(**values)


# -- cross-option checks --


def check(settings: Settings) -> None:
    """Refuse bad combinations before anything starts, naming both options."""
    from chaussette.backends import registry  # the registry knows what each backend can do

    given = settings.explicit
    if settings.fd is not None:
        for other in ("host", "port", "address_family", "socket_mode"):
            if other in given:
                raise UsageError(
                    f"--fd and {BY_NAME[other].flags[0]} cannot be used together: "
                    "the inherited socket is already bound"
                )
    host = settings.host
    is_unix = host.startswith("unix:")
    is_fd = host.startswith("fd://")
    if is_fd:
        for other in ("port", "address_family"):
            if other in given:
                raise UsageError(
                    f"--host {host} and {BY_NAME[other].flags[0]} cannot be used together: "
                    "the inherited socket is already bound"
                )
    if is_unix and "port" in given:
        raise UsageError("--host unix:PATH and --port cannot be used together")
    family = settings.address_family
    if family == "AF_UNIX" and not is_unix and not is_fd and settings.fd is None:
        raise UsageError("--address-family AF_UNIX needs --host unix:/path/to/socket")
    if family in ("AF_INET", "AF_INET6") and is_unix:
        raise UsageError(f"--address-family {family} and --host {host} disagree")
    if family == "AF_INET" and _is_address(socket.AF_INET6, host):
        raise UsageError(f"--address-family AF_INET and --host {host} (an IPv6 address) disagree")
    if family == "AF_INET6" and _is_address(socket.AF_INET, host):
        raise UsageError(f"--address-family AF_INET6 and --host {host} (an IPv4 address) disagree")
    if settings.socket_type != "SOCK_STREAM":
        raise UsageError(
            f"--socket-type {settings.socket_type} and --protocol {settings.protocol} disagree: "
            "every protocol needs SOCK_STREAM"
        )
    if settings.socket_mode is not None and not is_unix:
        raise UsageError(
            "--socket-mode applies only to a unix socket chaussette binds (--host unix:/path)"
        )
    info = registry.lookup(settings.protocol, settings.backend)
    if settings.spawn is not None and not info.pool:
        raise UsageError(
            f"--spawn is the greenlet pool size of a gevent/eventlet backend; "
            f"--backend {settings.backend} has none (use --threads)"
        )
    if "threads" in given and not info.threads:
        raise UsageError(f"--threads does not apply to --backend {settings.backend}")
    if settings.no_monkey and not info.monkey:
        raise UsageError(
            f"--no-monkey does not apply to --backend {settings.backend}: it never monkey-patches"
        )
    unix_wanted = is_unix or family == "AF_UNIX"
    if unix_wanted and not info.unix:
        raise UsageError(
            f"--backend {settings.backend} cannot serve a unix socket "
            f"(--host {host}); use a TCP host or another backend"
        )
    _check_protocol_options(settings)
    _check_mongrel2(settings)


OWN_PROTOCOLS = ("fastcgi", "scgi")  # the protocols chaussette's own drivers speak
REQUEST_MODELS = ("free", "rplex", "single")
REQUEST_MODEL_SYNTAX = "free[:max=N,timeout=SECONDS], rplex or single"


@dataclass(frozen=True)
class RequestModel:
    """A parsed --request-model: how the threads engine runs requests."""

    kind: str  # "free", "rplex" or "single"
    max: int | None = None  # free: most requests at once (None: --threads)
    timeout: float | None = None  # free: seconds an idle thread is kept (None: the default)


def parse_request_model(text: str) -> RequestModel:
    """``free[:max=N,timeout=T]``, ``rplex`` or ``single``; ValueError naming the problem."""
    kind, sep, rest = text.strip().partition(":")
    if kind not in REQUEST_MODELS:
        raise ValueError(f"unknown model {kind!r}; expected {REQUEST_MODEL_SYNTAX}")
    if not sep:
        return RequestModel(kind)
    if kind != "free":
        raise ValueError(f"{kind!r} takes no parameters; expected {REQUEST_MODEL_SYNTAX}")
    values: dict[str, str] = {}
    for item in rest.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq or name not in ("max", "timeout") or name in values:
            raise ValueError(f"bad parameter {item.strip()!r}; expected {REQUEST_MODEL_SYNTAX}")
        values[name] = value.strip()
    try:
        most = positive_int(values["max"]) if "max" in values else None
        idle = positive_float(values["timeout"]) if "timeout" in values else None
    except ValueError as exc:
        raise ValueError(f"{text.strip()!r}: {exc}") from None
    return RequestModel(kind, most, idle)


def _check_protocol_options(settings: Settings) -> None:
    """The options of chaussette's own FastCGI/SCGI servers, against protocol and backend."""
    given = settings.explicit
    protocol, backend = settings.protocol, settings.backend
    for name in ("max_conns", "max_params_size", "raw_handler"):
        if name in given and protocol not in OWN_PROTOCOLS:
            raise UsageError(
                f"{BY_NAME[name].flags[0]} applies to --protocol fastcgi or scgi, "
                f"not --protocol {protocol}"
            )
    if "max_reqs" in given and protocol != "fastcgi":
        hint = " (an SCGI connection carries one request: use --max-conns)"
        raise UsageError(
            f"--max-reqs applies to --protocol fastcgi, not --protocol {protocol}"
            + (hint if protocol == "scgi" else "")
        )
    if "request_model" in given:
        if protocol not in OWN_PROTOCOLS or backend != "threads":
            raise UsageError(
                "--request-model applies to --backend threads of --protocol fastcgi or scgi, "
                f"not --protocol {protocol} --backend {backend}"
            )
        try:
            parse_request_model(settings.request_model)
        except ValueError as exc:
            raise UsageError(f"--request-model {settings.request_model}: {exc}") from None


MONGREL2_OPTIONS = (
    "zeromq",
    "m2_config",
    "m2_handler",
    "m2_identity",
    "m2_dispatcher",
    "upload_dir",
)
_LISTEN_OPTIONS = ("host", "port", "fd", "address_family", "socket_mode", "backlog")


def _check_mongrel2(settings: Settings) -> None:
    """--protocol mongrel2 connects out over ZeroMQ: its options, and no listening socket."""
    given = settings.explicit
    if settings.protocol != "mongrel2":
        for name in MONGREL2_OPTIONS:
            if name in given:
                raise UsageError(
                    f"{BY_NAME[name].flags[0]} applies to --protocol mongrel2, "
                    f"not --protocol {settings.protocol}"
                )
        return
    for name in _LISTEN_OPTIONS:
        if name in given:
            raise UsageError(
                f"{BY_NAME[name].flags[0]} {settings.values[name]} does not apply to "
                "--protocol mongrel2: a Mongrel2 handler listens on nothing, it connects to "
                "Mongrel2 (--zeromq or --m2-config)"
            )
    if settings.zeromq and settings.m2_config:
        raise UsageError(
            "--zeromq and --m2-config cannot be used together: the endpoints come from one"
        )
    if not settings.zeromq and not settings.m2_config:
        raise UsageError(
            "--protocol mongrel2 needs the handler's endpoints: --zeromq SEND_SPEC[,RECV_SPEC] "
            "or --m2-config config.sqlite"
        )
    if settings.m2_handler and not settings.m2_config:
        raise UsageError("--m2-handler picks a handler of --m2-config; give --m2-config too")
    if settings.zeromq:
        from chaussette.drivers.m2config import parse_zeromq  # stdlib only

        try:
            endpoints = parse_zeromq(settings.zeromq)
        except ValueError as exc:
            raise UsageError(f"--zeromq {settings.zeromq}: {exc}") from None
        if endpoints.identity and settings.m2_identity:
            raise UsageError(
                f"--zeromq {settings.zeromq} names an identity and so does --m2-identity: "
                "give it once"
            )


def _is_address(family: socket.AddressFamily, host: str) -> bool:
    """Is ``host`` a literal address of ``family`` (IPv6 with or without brackets)?"""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        socket.inet_pton(family, bare)
    except (OSError, ValueError):
        return False
    return True
