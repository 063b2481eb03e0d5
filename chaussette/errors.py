"""The errors chaussette reports to its user, each with the exit code it ends the process with.

Exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error,
3 the application could not be loaded.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_APP = 3


class ChaussetteError(Exception):
    """An error meant for the user: one line, no traceback."""

    exit_code = EXIT_RUNTIME


class UsageError(ChaussetteError):
    """A wrong flag, a bad value or a bad combination of options."""

    exit_code = EXIT_USAGE


class SocketError(UsageError):
    """The listening socket cannot be adopted or bound as configured."""


class MissingDependency(UsageError):
    """An optional library the chosen feature needs is not installed."""

    def __init__(self, what: str, module: str, extra: str, install: str | None = None) -> None:
        hint = install or f"pip install 'chaussette[{extra}]'"
        super().__init__(f"{what} needs {module}: {hint}")
        self.module = module
        self.extra = extra


class AppLoadError(ChaussetteError):
    """The application spec does not lead to a WSGI callable.

    When the failure was an exception raised inside the user's own code, ``user_exc``
    holds it so that its real traceback is shown.
    """

    exit_code = EXIT_APP

    def __init__(self, message: str, user_exc: BaseException | None = None) -> None:
        super().__init__(message)
        self.user_exc = user_exc


class HookError(ChaussetteError):
    """A --pre-hook or --post-hook could not be loaded or raised."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, user_exc: BaseException | None = None) -> None:
        super().__init__(message)
        self.user_exc = user_exc
