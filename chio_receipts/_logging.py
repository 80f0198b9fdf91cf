"""The process's log output: plain text or one JSON object per line, chosen at the entry point.

:func:`configure` installs the one handler on the root logger (the root command calls it with
``--log-format``); :func:`use_level` lets a command set its level and installs a text handler when
no entry point did (the standalone module entries of the tests). A JSON record carries the time,
level, logger and message only — no extra fields, so nothing the caller did not put in the message
(activity arguments, secrets) can leak through a formatter.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

__all__ = ["JsonFormatter", "LogFormat", "configure", "use_level"]

LogFormat = Literal["text", "json"]
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "chio-receipts"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``
    and, when the record carries one, ``exception`` (the formatted traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (as ``logging.lastResort``
    does), so a swapped or closed stream (a test runner's) is never kept."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _ours() -> logging.Handler | None:
    return next((h for h in logging.getLogger().handlers if h.name == _HANDLER_NAME), None)


def configure(log_format: LogFormat = "text", level: int | str = logging.WARNING) -> None:
    """Make the root logger write ``log_format`` lines to stderr at ``level`` (replacing any
    handler an earlier call installed)."""
    root = logging.getLogger()
    previous = _ours()
    if previous is not None:
        root.removeHandler(previous)
    handler = _StderrHandler()
    handler.name = _HANDLER_NAME
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def use_level(level: int | str) -> None:
    """Log at ``level`` from here on, in the format the entry point chose (text if none did)."""
    if _ours() is None and not logging.getLogger().handlers:
        configure("text", level)
        return
    logging.getLogger().setLevel(level.upper() if isinstance(level, str) else level)
