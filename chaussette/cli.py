"""argv -> Settings -> a serving process; every error -> one clear line and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from chaussette import __version__, prefork
from chaussette.backends import registry
from chaussette.errors import EXIT_OK, EXIT_RUNTIME, ChaussetteError
from chaussette.launcher import report, start
from chaussette.settings import check, parse_args


def main(argv: Sequence[str] | None = None) -> int:
    """Run chaussette; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = parse_args(argv)
        if settings.version:
            print(f"chaussette {__version__}")
            return EXIT_OK
        if settings.list_backends:
            print(registry.table())
            return EXIT_OK
        check(settings)
        prefork.check(settings)
        return start(settings)
    except ChaussetteError as exc:
        report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("chaussette: interrupted", file=sys.stderr)
        return EXIT_RUNTIME


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
