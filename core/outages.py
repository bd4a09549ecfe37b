"""What counts as an outage, in every process: the database away, the disk full, the broker down.

An outage is waited out or answered (503/507, tasks/jobs.py retries); a bug
still raises. Each process asks the same questions here, so the web, the
pool children and beat's sweeper can never disagree on what is worth a retry:

* :func:`database_outage` classifies an exception from SQLAlchemy: the server
  cannot be reached (PostgreSQL stopped or restarting, a connection cut,
  the pool exhausted, SQLite locked past its timeout or unopenable) or its
  disk is full (SQLite's ``SQLITE_FULL``, PostgreSQL's ``disk_full``,
  ``ENOSPC``). A bad query (``no such table``, a constraint) is not one.
* :func:`disk_problem` says whether ``VAR_DIR`` has room left: SQLite, the
  embedded Redis's AOF and beat's schedule store all write there.
* :func:`redis_refusals_are_connection_errors`: a Redis whose AOF cannot be
  written (disk full) refuses every write, ``BRPOP`` included, with
  ``MISCONF``. redis-py raises that as a plain ``ResponseError``, which kombu
  counts as a channel error: the Celery worker's consumer died of it
  ("Unrecoverable error") and honcho stopped the whole set. Raised as a
  connection error instead, Celery reconnects with backoff and carries on
  when a write succeeds again.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import redis
from redis._parsers.base import BaseParser
from sqlalchemy import exc

UNREACHABLE = "unreachable"
DISK_FULL = "disk full"

#: ``VAR_DIR`` with less room than this is reported full by ``/readyz``.
MIN_FREE_BYTES = 1024 * 1024

_SQLITE_UNREACHABLE = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN,
                       sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PROTOCOL}
_PG_DISK_FULL = "53100"  # SQLSTATE disk_full


def database_outage(error: BaseException) -> str | None:
    """:data:`DISK_FULL`, :data:`UNREACHABLE`, or None when ``error`` is not an outage."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return DISK_FULL
    if isinstance(error, exc.TimeoutError | exc.DisconnectionError):  # pool exhausted; ping failed
        return UNREACHABLE
    if not isinstance(error, exc.DBAPIError):
        return None
    original = error.orig
    if isinstance(original, sqlite3.Error):
        return _sqlite_outage(original)
    if getattr(original, "sqlstate", None) == _PG_DISK_FULL:
        return DISK_FULL
    if error.connection_invalidated or isinstance(error, exc.OperationalError | exc.InterfaceError):
        return UNREACHABLE  # psycopg: refused, reset, admin shutdown, server starting up ...
    return None


def _sqlite_outage(error: sqlite3.Error) -> str | None:
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:  # built by hand, not by SQLite: the message is all there is
        text = str(error)
        if "disk is full" in text:
            return DISK_FULL
        return UNREACHABLE if "locked" in text or "unable to open" in text else None
    primary = code & 0xFF  # extended result codes keep the primary one in the low byte
    if primary == sqlite3.SQLITE_FULL:
        return DISK_FULL
    return UNREACHABLE if primary in _SQLITE_UNREACHABLE else None


def describe(kind: str) -> str:
    """The message an API client reads for an outage (app/api.py)."""
    if kind == DISK_FULL:
        return "the disk holding the database is full; try again once space is freed"
    return "the database is unreachable; try again shortly"


def disk_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot take writes (nearly no space left), or None."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None  # not created yet: nothing has written there
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        return f"disk full: {free} bytes free in {directory}"
    return None


class RedisWriteRefused(redis.ConnectionError):
    """Redis answered ``MISCONF``: it cannot persist writes (its disk is full), so it takes none."""


def redis_refusals_are_connection_errors() -> None:
    """Every process that talks to Redis: raise ``MISCONF`` as a connection error (see above)."""
    BaseParser.EXCEPTION_CLASSES["MISCONF"] = RedisWriteRefused
