"""One log format for every process of the set.

gunicorn, Celery and the app all write through the root logger with this
format, so a ``honcho start`` screen reads as one story: who (role and pid),
when, what. gunicorn takes :data:`LOGGING` via ``logconfig_dict``; Celery is
kept off the root logger (``worker_hijack_root_logger=False``) and calls
:func:`configure` from its ``setup_logging`` signal.

The level is the validated ``LOG_LEVEL`` setting (core/config.py): a bad value
stops the process at start, naming it. The settings are read when the
logging is configured, not at import: the broker's watcher (after its exec)
gets the level on its command line and never loads pydantic.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

FORMAT = "%(asctime)s.%(msecs)03d %(role)s[%(process)d] %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"

_role = "main"


def set_role(role: str) -> None:
    """Name this process in every line it logs (``web``, ``worker.child`` ...)."""
    global _role
    _role = role


def role() -> str:
    return _role


class RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class QuietRejects(logging.Filter):
    """Drop the traceback Celery attaches to every ``Reject`` of the job task.

    stopright's own filter quiets its plain hand-backs; the job task rejects
    in more ways at a stop (not claimed, outcome not stored, no longer this
    run's), each already logged in one line by tasks/jobs.py: a traceback per
    running job would bury the shutdown sequence.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and type(record.exc_info[1]).__name__ == "Reject":
            record.exc_info = None
            record.exc_text = None
        return True


LOGGING: dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"role": {"()": RoleFilter}, "quiet_rejects": {"()": QuietRejects}},
    "formatters": {"plain": {"format": FORMAT, "datefmt": DATEFMT}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "plain",
            "filters": ["role", "quiet_rejects"],
        }
    },
    "root": {"handlers": ["stdout"], "level": "INFO"},  # LOG_LEVEL: logging_config()
    "loggers": {
        # gunicorn's own loggers propagate to root instead of keeping handlers.
        "gunicorn.error": {"handlers": [], "propagate": True},
        "gunicorn.access": {"handlers": [], "propagate": True, "level": "WARNING"},
    },
}


def logging_config(level: str | None = None) -> dict[str, Any]:
    """:data:`LOGGING` at ``level``, by default the ``LOG_LEVEL`` setting (exits if it is bad)."""
    if level is None:
        from core.config import get_settings  # here, not at the top: see the module docstring

        level = get_settings().log_level
    return {**LOGGING, "root": {**LOGGING["root"], "level": level}}


def configure(role: str | None = None, level: str | None = None) -> None:
    if role:
        set_role(role)
    logging.config.dictConfig(logging_config(level))
