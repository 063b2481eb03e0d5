"""Logging set-up: the classic format, --log-output (reopened on SIGUSR1), --log-config,
--access-log."""

from __future__ import annotations

import configparser
import json
import logging
import logging.config
import os
import sys
from typing import Any

from chaussette.errors import UsageError

FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"
ACCESS = "chaussette.access"


class ReopenableFileHandler(logging.FileHandler):
    """A file handler that logrotate can move away: ``reopen()`` on SIGUSR1."""

    def reopen(self) -> None:
        _reopen(self)


def _reopen(handler: logging.FileHandler) -> None:
    """Close the stream and open the path again (a new file if it was renamed)."""
    handler.acquire()
    try:
        if handler.stream:
            try:
                handler.stream.flush()
            finally:
                handler.stream.close()
        handler.stream = handler._open()
    finally:
        handler.release()


def setup(level: str, output: str, config: str | None, access_log: str | None) -> None:
    """Configure logging for one chaussette process (may be called again: it starts over)."""
    root = logging.getLogger()
    access = logging.getLogger(ACCESS)
    for logger in (root, access):
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
            handler.close()
    access.setLevel(logging.NOTSET)
    access.propagate = True
    if config:
        _from_config(config)
    else:
        handler = _handler(output, "--log-output")
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        root.addHandler(handler)
        root.setLevel(level.upper())
    if access_log:
        access.setLevel(logging.INFO)
        if access_log != "-":
            handler = _handler(access_log, "--access-log")
            handler.setFormatter(logging.Formatter("%(message)s"))
            access.addHandler(handler)
            access.propagate = False
    elif access.level == logging.NOTSET and not access.handlers:
        # off unless asked for (with --access-log, or by a --log-config that sets it up)
        access.setLevel(logging.WARNING)
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
            if not isinstance(config, dict):
                raise ValueError("expected a JSON object (a logging.config.dictConfig schema)")
            # loggers such as "chaussette" exist already: a config that does not name them
            # must not silence them
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        ImportError,
        OSError,
        RuntimeError,
        configparser.Error,
    ) as exc:
        raise UsageError(f"--log-config {path}: {type(exc).__name__}: {exc}") from None


def reopen() -> int:
    """Reopen every file handler of every logger; returns how many."""
    loggers = [logging.getLogger(), *list(logging.root.manager.loggerDict.values())]
    seen: set[int] = set()
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.FileHandler) and id(handler) not in seen:
                seen.add(id(handler))
                _reopen(handler)
    return len(seen)
