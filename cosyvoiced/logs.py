"""One structlog pipeline: JSON lines to stdout (journald) and to a size-rotated file.

Records from libraries that use stdlib `logging` go through the same renderer. The worker
process renders its lines itself and ships them to the supervisor, which writes them through
its own handlers, so there is exactly one writer of the log file.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

from cosyvoiced import logring
from cosyvoiced.config import LogConfig

RENDERED_ATTR = "cosyvoiced_rendered"

# Libraries whose debug lines trace their own internals, not the daemon's work: markdown-it-py
# (4.3 on) logs every block rule it tries, about 120 lines for one sentence, which at
# `level = "debug"` buried the log and slowed each intake that cleans text.
_INTERNALS_AT_DEBUG = ("markdown_it",)
# A string value in a log line, at most: a line that quoted a client's text in full was
# megabytes (in the file, journald and the console's ring of the last lines alike).
MAX_VALUE_CHARS = 2048


def _stamp_process(role: str) -> Processor:
    pid = os.getpid()

    def stamp(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("proc", role)
        event_dict.setdefault("pid", pid)
        return event_dict

    return stamp


def _clip_long_strings(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            event_dict[key] = f"{value[:MAX_VALUE_CHARS]}... ({len(value)} characters)"
    return event_dict


def _shared_chain(role: str) -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _stamp_process(role),
        _clip_long_strings,
    ]


class _JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """Renders records as JSON; passes lines that another process rendered through as is."""

    def format(self, record: logging.LogRecord) -> str:
        rendered = getattr(record, RENDERED_ATTR, None)
        if rendered is not None:
            return str(rendered)
        return str(super().format(record))


# sd-daemon(3) priority prefixes: journald strips them and files the line at that level.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
               logging.CRITICAL: 2}


class _JournalFormatter(_JsonFormatter):
    """JSON lines with a `<N>` priority prefix, for stdout when it is the journal."""

    def format(self, record: logging.LogRecord) -> str:
        level = max((lv for lv in _PRIORITIES if lv <= record.levelno), default=logging.DEBUG)
        return f"<{_PRIORITIES[level]}>{super().format(record)}"


def stdout_is_journal() -> bool:
    """True when systemd connected stdout to journald ($JOURNAL_STREAM is its dev:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def _formatter(role: str, journal: bool = False) -> logging.Formatter:
    kind = _JournalFormatter if journal else _JsonFormatter
    return kind(
        foreign_pre_chain=_shared_chain(role),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
    )


def _install(role: str, level: str, handlers: list[logging.Handler]) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        if handler.formatter is None:
            handler.setFormatter(_formatter(role))
        root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _INTERNALS_AT_DEBUG:
        logging.getLogger(name).setLevel(logging.INFO)
    structlog.configure(
        processors=[*_shared_chain(role), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def configure_supervisor(config: LogConfig) -> None:
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(_formatter("supervisor", journal=stdout_is_journal()))
    handlers: list[logging.Handler] = [stdout, logring.RING]  # RING: the console's tail
    if config.file:
        os.makedirs(os.path.dirname(config.file), exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            config.file, maxBytes=config.max_bytes, backupCount=config.backups,
            encoding="utf-8"))
    _install("supervisor", config.level, handlers)


class _ShipHandler(logging.Handler):
    def __init__(self, ship: Callable[[int, str], None]) -> None:
        super().__init__()
        self._ship = ship

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._ship(record.levelno, self.format(record))
        except Exception:  # noqa: BLE001 - a broken pipe means the supervisor is gone
            self.handleError(record)


def configure_worker(level: str, ship: Callable[[int, str], None]) -> None:
    """Worker side: render each record and hand the line to `ship` (the pipe to the parent)."""
    _install("worker", level, [_ShipHandler(ship)])


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def forward(levelno: int, line: str) -> None:
    """Supervisor side: write a line the worker rendered through this process's handlers."""
    if levelno < logging.getLogger().level:
        return  # the level was raised by a reload since the worker started
    record = logging.makeLogRecord({"name": "cosyvoiced.worker", "levelno": levelno,
                                    "levelname": logging.getLevelName(levelno),
                                    RENDERED_ATTR: line})
    logging.getLogger("cosyvoiced.worker").handle(record)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
