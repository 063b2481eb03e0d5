"""Logging set-up: the classic format, --log-output (reopened on SIGUSR1), --log-config,
--access-log."""

from __future__ import annotations

import json
import logging
import logging.config
import os
import sys
from typing import Any

from chaussette.errors import UsageError

FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"


class ReopenableFileHandler(logging.FileHandler):
    """A file handler that logrotate can move away: ``reopen()`` on SIGUSR1."""

    def reopen(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.stream:
                self.stream.close()
            self.stream = self._open()


def setup(level: str, output: str, config: str | None, access_log: str | None) -> None:
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    if config:
        _from_config(config)
    else:
        handler = _handler(output, "--log-output")
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        root.addHandler(handler)
        root.setLevel(level.upper())
    access = logging.getLogger("chaussette.access")
    if access_log:
        access.setLevel(logging.INFO)
        if access_log != "-":
            handler = _handler(access_log, "--access-log")
            handler.setFormatter(logging.Formatter("%(message)s"))
            access.addHandler(handler)
            access.propagate = False
    elif not config:
        access.setLevel(logging.WARNING)  # off unless asked for
    logging.captureWarnings(True)


def _handler(target: str, flag: str) -> logging.Handler:
    if target == "-":
        return logging.StreamHandler(sys.stdout)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise UsageError(f"{flag} {target}: directory {directory} does not exist")
    try:
        return ReopenableFileHandler(target, delay=False)
    except OSError as exc:
        raise UsageError(f"{flag} {target}: {exc.strerror}") from None


def _from_config(path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"--log-config {path}: no such file")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                config: Any = json.load(f)
            logging.config.dictConfig(config)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
        raise UsageError(f"--log-config {path}: {exc}") from None


def reopen() -> int:
    """Reopen every file handler we know how to reopen; returns how many."""
    count = 0
    loggers = [logging.getLogger()] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
    ]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, ReopenableFileHandler):
                handler.reopen()
                count += 1
            elif isinstance(handler, logging.FileHandler):
                handler.acquire()
                try:
                    handler.close()
                    handler.stream = handler._open()
                finally:
                    handler.release()
                count += 1
    return count
