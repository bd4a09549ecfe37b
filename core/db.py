"""The SQLAlchemy engine: opened lazily, once per process, closed at exit.

Pooled connections must never cross a fork: a child that used its parent's
sockets would interleave traffic with it, and closing them would end the
parent's session. :func:`after_fork` runs in every forked child (gunicorn
``post_fork``, Celery ``worker_process_init``) and drops the inherited pool
without closing it (``dispose(close=False)``); the child then opens its own
connections and registers their close in its own shutdown registry.

A PostgreSQL that is up but not answering (frozen: a stuck disk, a paused VM)
still acknowledges TCP, so no socket-level timeout ever fires and a query
waits for ever (requests and a worker's stop hung as long as the
freeze). Here every wait on it ends in the client, within
``DATABASE_TIMEOUT_SECONDS`` or a thread's shorter :func:`deadline`, as an
outage (503): a statement's wait through psycopg's own bounded wait, after
which the connection is closed with a Terminate message (the server ends
the session cleanly when it wakes); a connection attempt in a thread of its
own, which the caller stops waiting on (:class:`_Attempt`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.pool import NullPool

from core.config import get_settings
from stopright import registry

#: libpq's (and psycopg's) shortest connect_timeout: an attempt runs at least this long.
MIN_CONNECT_TIMEOUT_SECONDS = 2
#: How long data sent to PostgreSQL may stay unacknowledged before the connection is dropped.
TCP_USER_TIMEOUT_MS = 5000
#: How long a thread waits for a free pooled connection (SQLAlchemy's default: 30 s).
POOL_TIMEOUT_SECONDS = 5
#: psycopg's default interval between its checks for signals while it waits (tests/unit checks it).
PSYCOPG_WAIT_INTERVAL = 0.1

_engine: Engine | None = None
_engine_pid: int | None = None
_write_lock = threading.Lock()
_local = threading.local()  # .deadline: this thread's (time.monotonic()), see deadline()


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
    postgres = url.startswith("postgresql")
    connect_args = {"tcp_user_timeout": TCP_USER_TIMEOUT_MS} if postgres else {}
    if pooled:
        pool = {"pool_pre_ping": True, "pool_timeout": POOL_TIMEOUT_SECONDS}
    engine = create_engine(url, connect_args=connect_args, **pool)
    if postgres and engine.dialect.driver == "psycopg":
        event.listen(engine, "do_connect", _connect)
        event.listen(engine, "handle_error", _ping_not_answered)
    return engine


# -- a PostgreSQL that does not answer: every wait bounded in the client ---------------------------


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """This thread's database waits inside the block end within ``seconds`` from now (nested: the earliest).

    For a stop's own bounds (a pool child handing its job back must be done
    before the MainProcess's SIGKILL) and readiness (about 1 s).
    """
    outer = getattr(_local, "deadline", None)
    ends = time.monotonic() + seconds
    _local.deadline = ends if outer is None else min(outer, ends)
    try:
        yield
    finally:
        _local.deadline = outer


def _wait_budget() -> float:
    """How long this thread's next wait on the server may take: the setting, or less under a deadline."""
    budget = get_settings().database_timeout_seconds
    ends = getattr(_local, "deadline", None)
    return budget if ends is None else max(0.0, min(budget, ends - time.monotonic()))


@functools.cache
def _psycopg() -> tuple[type, type]:
    """psycopg's pieces, imported only for PostgreSQL: (NotAnswering, BoundedConnection)."""
    import psycopg
    from psycopg import errors

    class NotAnswering(psycopg.OperationalError):
        """PostgreSQL did not answer within the budget; the connection is closed (an outage: 503)."""

    class BoundedConnection(psycopg.Connection):
        """A psycopg connection whose every wait on the server ends within the thread's budget.

        psycopg waits on its socket in ``wait()`` (every statement, commit,
        rollback and pre-ping) with no time limit unless given one; here it is
        given the budget. Past it, the protocol is mid-exchange and the
        connection useless: it is closed, which sends Terminate, so a server
        that wakes up later runs what it received, reads the Terminate and
        ends the session cleanly (no "unexpected EOF", no reset).
        """

        def wait(self, gen: Any, interval: float = PSYCOPG_WAIT_INTERVAL,
                 timeout: float | None = None) -> Any:
            if timeout is not None:  # psycopg's own bounded waits (a cancel) keep their meaning
                return super().wait(gen, interval, timeout)
            budget = _wait_budget()
            try:
                return super().wait(gen, interval, budget)
            except errors._WaitTimeout:
                self.close()
                raise NotAnswering(f"PostgreSQL did not answer within {budget:.1f} s "
                                   "(up but not answering?); connection closed") from None

    return NotAnswering, BoundedConnection


def _connect(_dialect: Any, _record: Any, cargs: tuple, cparams: dict[str, Any]) -> Any:
    """SQLAlchemy's ``do_connect``: a bounded connection, opened within this thread's budget."""
    not_answering, bounded = _psycopg()
    budget = _wait_budget()
    if budget <= 0:  # this thread's deadline has passed: no attempt left to wait for
        raise not_answering("no time left to connect to PostgreSQL (the caller's deadline has passed)")
    timeout = max(MIN_CONNECT_TIMEOUT_SECONDS, math.ceil(get_settings().database_timeout_seconds))
    params = {"connect_timeout": timeout, **cparams}  # a connect_timeout in DATABASE_URL wins
    attempt = _Attempt(lambda: bounded.connect(*cargs, **params))
    if attempt.wait(budget):
        return attempt.result()
    raise not_answering(f"PostgreSQL did not accept a connection within {budget:.1f} s "
                        "(up but not answering?)")


class _Attempt:
    """One connection attempt, in a thread of its own: the caller can stop waiting, the attempt cannot.

    libpq's connect_timeout cannot be under 2 s, and an attempt abandoned in
    the middle leaves a half-open connection in the frozen server's backlog.
    So the attempt runs to its own end (its connect_timeout) whoever waits:
    a connection it gets after its caller left is closed properly (Terminate);
    one it cannot get is dropped at once. psycopg keeps a failed attempt's
    error in a reference cycle with the frame holding its socket, so the
    socket stayed open until the garbage collector ran, and the server, once
    awake, waited for a login that never came, then logged a reset when the
    process exited. The traceback is dropped here.
    """

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._abandoned = False
        self._conn: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(connect,), name="db-connect", daemon=True).start()

    def _run(self, connect: Callable[[], Any]) -> None:
        try:
            conn = connect()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            conn, self._error = None, exc.with_traceback(None)  # frees the attempt's socket now
        with self._lock:
            late = self._abandoned
            self._conn = conn
            self._done.set()
        if late and conn is not None:
            conn.close()

    def wait(self, seconds: float) -> bool:
        """True once the attempt ended within ``seconds``; else the attempt is abandoned to its thread."""
        if self._done.wait(seconds):
            return True
        with self._lock:
            self._abandoned = not self._done.is_set()
            return not self._abandoned

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._conn


def _ping_not_answered(context: ExceptionContext) -> None:
    """A pre-ping that the server did not answer in time is no disconnect: do not reconnect at once.

    SQLAlchemy reconnects after a failed pre-ping; against a frozen server
    that would wait a second budget within the same request.
    """
    if context.is_pre_ping and isinstance(context.original_exception, _psycopg()[0]):
        context.is_disconnect = False


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
