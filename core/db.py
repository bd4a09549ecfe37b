"""The SQLAlchemy engine: opened lazily, once per process, closed at exit.

Pooled connections must never cross a fork: a child that used its parent's
sockets would interleave traffic with it, and closing them would end the
parent's session. :func:`after_fork` runs in every forked child (gunicorn
``post_fork``, Celery ``worker_process_init``) and drops the inherited pool
without closing it (``dispose(close=False)``); the child then opens its own
connections and registers their close in its own shutdown registry.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool

from core.config import get_settings
from stopright import registry

#: How long opening a PostgreSQL connection may take (libpq's minimum is 2 s).
CONNECT_TIMEOUT_SECONDS = 2
#: How long data sent to PostgreSQL may stay unacknowledged before the connection is dropped.
TCP_USER_TIMEOUT_MS = 5000
#: How long a thread waits for a free pooled connection (SQLAlchemy's default: 30 s).
POOL_TIMEOUT_SECONDS = 5

_engine: Engine | None = None
_engine_pid: int | None = None
_write_lock = threading.Lock()


def get_engine() -> Engine:
    global _engine, _engine_pid
    if _engine is not None and _engine_pid != os.getpid():
        after_fork()
    engine = _engine
    if engine is None:
        engine = _engine = _create(get_settings().sqlalchemy_url)
        _engine_pid = os.getpid()
        # During shutdown the registry closes a late resource at once; the
        # caller still gets a working engine for the request in hand.
        registry.current().register("database", close, forks=False)
        if _engine is None:  # closed at once: this process is stopping
            # An engine without a pool: each connection closes when the request
            # releases it. A pooled one would be left open, closed by no one: the
            # exit drops it (PostgreSQL logs "unexpected EOF"; Python 3.13 warns).
            engine = _create(get_settings().sqlalchemy_url, pooled=False)
    return engine


@contextlib.contextmanager
def transaction() -> Iterator[Connection]:
    """A write transaction; on SQLite, one at a time per process.

    SQLite lets one writer in at a time. A writer that finds the database
    locked sleeps in SQLite's busy handler (1, 2, 5, 10 ... ms) and often
    wakes long after the lock came and went: with sixteen web threads and two
    pool children writing, most of a job's time went to those sleeps
    (py-spy, scripts/bench). Queued on a lock, a process's writers get the
    database one after another without sleeping; only processes contend.
    PostgreSQL locks rows, so there the lock is skipped.
    """
    engine = get_engine()
    serial = _write_lock if engine.dialect.name == "sqlite" else contextlib.nullcontext()
    with serial, engine.begin() as conn:
        yield conn


def _create(url: str, *, pooled: bool = True) -> Engine:
    pool = {} if pooled else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # An unreachable server must cost a request seconds, not minutes: psycopg's default is to
    # wait for the OS's TCP connect timeout (about two minutes for a host that drops packets),
    # and a server that vanished without a reset leaves a pooled connection's ping waiting for
    # TCP to give up (about 15 minutes); tcp_user_timeout ends it when sent data goes unacked.
    # A refused or reset connection fails at once either way (core/outages.py makes it a 503).
    connect_args = ({"connect_timeout": CONNECT_TIMEOUT_SECONDS, "tcp_user_timeout": TCP_USER_TIMEOUT_MS}
                    if url.startswith("postgresql") else {})
    if pooled:
        pool = {"pool_pre_ping": True, "pool_timeout": POOL_TIMEOUT_SECONDS}
    return create_engine(url, connect_args=connect_args, **pool)


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    # WAL lets the web read while a worker writes; NORMAL is durable in WAL mode.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def after_fork() -> None:
    """In a forked child: forget the parent's pool without touching its sockets."""
    global _engine, _engine_pid, _write_lock
    _write_lock = threading.Lock()  # another thread of the parent may have held it at fork
    if _engine is not None and _engine_pid != os.getpid():
        _engine.dispose(close=False)
        _engine_pid = os.getpid()
        registry.current().register("database", close, forks=False)


def close() -> None:
    """Close every pooled connection of this process (at shutdown)."""
    global _engine
    if _engine is not None and _engine_pid == os.getpid():
        _engine.dispose()
        _engine = None
