"""The job ledger: every accepted job and its state, in the database.

The ledger, not the broker, is the source of truth. A 202 from the API means
the row is committed; the queue message only says "look at job X". That is
what makes shutdown safe:

* a task claims its job with one conditional UPDATE, and only a ``queued``
  job can be claimed, so a message delivered twice (handed back, restored
  after a crash, republished by the sweeper) runs the job at most once at a
  time and never after it finished;
* ``attempts`` is a fencing token: a stale run cannot overwrite a newer one;
* a run ended by a shutdown is *handed back* (``running`` -> ``queued``, the
  attempt not counted), never marked failed;
* only the sweeper (beat, jobs/sweeper.py) takes a ``running`` job back, and
  only once it has seen the lease lapsed on two sweeps at least a renewal
  period apart (``lapsed_at``). A run that is alive but could not renew
  (the database was away longer than the lease) renews as soon as it can
  and clears the mark in between, so an outage never starts a second run
  beside the first: the hazard that ran jobs five times in parallel and
  failed them;
* the row is the outbox: a job whose message could not be published (broker
  down) carries ``unpublished_since`` until it is, and the sweeper
  republishes such jobs at once, not after ``JOB_QUEUED_LEASE_SECONDS``.

Times are naive UTC datetimes, which SQLite and PostgreSQL both store as is.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    exc,
    inspect,
    select,
    text,
    update,
)

from core import db

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
FINISHED = (SUCCEEDED, FAILED)

metadata = MetaData()
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("task", String(64), nullable=False),
    Column("args", JSON, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("result", JSON),
    Column("error", Text),
    Column("created_at", DateTime, nullable=False),
    Column("queued_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("lease_until", DateTime),
    # Both added to an existing table by ensure_schema().
    Column("lapsed_at", DateTime),  # when a sweep first saw the running job's lease lapsed
    Column("unpublished_since", DateTime),  # queued, but its message is not on the broker yet
)
ADDED_COLUMNS = ("lapsed_at", "unpublished_since")

#: The lease keeper renews a running job's lease this many times per lease (tasks/jobs.py).
RENEWALS_PER_LEASE = 3

PUBLIC_FIELDS = ("id", "task", "args", "status", "attempts", "result", "error",
                 "created_at", "started_at", "finished_at")

_schema_ready_pid: int | None = None

# The hot path (every job: create, claim, succeed; every poll: get) runs
# statements built once, with bound parameters: building a statement and its
# cache key on each call cost more CPU than SQLite's execution of it.
_RUNNABLE = and_(jobs.c.id == bindparam("p_id"), jobs.c.status == QUEUED)
_FENCED = and_(jobs.c.id == bindparam("p_id"), jobs.c.status == RUNNING,
               jobs.c.attempts == bindparam("p_attempt"))
_GET = select(jobs).where(jobs.c.id == bindparam("p_id"))
_CREATE = jobs.insert()
# One statement on the common path: UPDATE ... RETURNING (SQLite 3.35+, PostgreSQL).
_CLAIM = (update(jobs).where(_RUNNABLE, jobs.c.attempts < bindparam("p_max"))
          .values(status=RUNNING, attempts=jobs.c.attempts + 1, started_at=bindparam("p_now"),
                  finished_at=None, lease_until=bindparam("p_until"), lapsed_at=None,
                  unpublished_since=None)
          .returning(*jobs.columns))
_SUCCEED = update(jobs).where(_FENCED).values(status=SUCCEEDED, result=bindparam("p_result"),
                                              error=None, finished_at=bindparam("p_now"),
                                              lease_until=None)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def ensure_schema() -> None:
    """Create the table if missing, add columns it lacks; every process may race to do it at start."""
    engine = db.get_engine()
    try:
        metadata.create_all(engine)
    except exc.DBAPIError:  # another process created it between check and CREATE
        if not inspect(engine).has_table(jobs.name):
            raise
    present = _column_names(engine)
    for name in ADDED_COLUMNS:
        if name in present:
            continue
        kind = jobs.c[name].type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {jobs.name} ADD COLUMN {name} {kind}"))
        except exc.DBAPIError:  # another process added it first
            if name not in _column_names(engine):
                raise


def _column_names(engine) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns(jobs.name)}


def create(task: str, args: dict[str, Any], *, unpublished: bool = False) -> dict[str, Any]:
    """Store a new queued job; ``unpublished`` when its message cannot be published now."""
    now = utcnow()
    row = {"id": uuid.uuid4().hex, "task": task, "args": args, "status": QUEUED,
           "attempts": 0, "created_at": now, "queued_at": now}
    if unpublished:
        row["unpublished_since"] = now
    with db.transaction() as conn:
        conn.execute(_CREATE, row)
    return {column.name: None for column in jobs.columns} | row


def get(job_id: str) -> dict[str, Any] | None:
    with db.get_engine().connect() as conn:
        row = conn.execute(_GET, {"p_id": job_id}).mappings().first()
    return dict(row) if row else None


def claim(job_id: str, *, lease: float, max_attempts: int) -> dict[str, Any] | None:
    """Start a run of the job; None when it is not runnable (finished, or running elsewhere).

    Runnable means queued. A running job is never claimed, even past its
    lease: its run may be alive and unable to renew (a database outage).
    The sweeper decides when it is dead (:func:`sweep_stranded`). A job out
    of attempts is marked failed instead.
    """
    now = utcnow()
    params = {"p_id": job_id, "p_now": now, "p_max": max_attempts,
              "p_until": now + timedelta(seconds=lease)}
    with db.transaction() as conn:
        claimed = conn.execute(_CLAIM, params).mappings().first()
        if claimed is not None:
            return dict(claimed)
        conn.execute(
            update(jobs).where(_RUNNABLE, jobs.c.attempts >= bindparam("p_max")).values(
                status=FAILED, finished_at=now, lease_until=None,
                error=f"gave up after {max_attempts} attempts (each ended without finishing)"),
            params)
        return None


def _fenced_update(statement, job_id: str, attempt: int, **params: Any) -> bool:
    """Run an UPDATE fenced by ``_FENCED``: it changes the row only for the run that owns it."""
    with db.transaction() as conn:
        return bool(conn.execute(statement, {"p_id": job_id, "p_attempt": attempt, **params}).rowcount)


def renew(job_id: str, attempt: int, *, lease: float) -> bool:
    """Extend this run's lease (and clear a sweep's lapse mark); False when the run is no longer the job's."""
    return _fenced_update(update(jobs).where(_FENCED).values(lease_until=bindparam("p_until"),
                                                              lapsed_at=None),
                          job_id, attempt, p_until=utcnow() + timedelta(seconds=lease))


def succeed(job_id: str, attempt: int, result: Any) -> bool:
    return _fenced_update(_SUCCEED, job_id, attempt, p_result=result, p_now=utcnow())


def fail(job_id: str, attempt: int, error: str) -> bool:
    return _fenced_update(update(jobs).where(_FENCED).values(
        status=FAILED, error=error, finished_at=utcnow(), lease_until=None), job_id, attempt)


def hand_back(job_id: str, attempt: int, *, started_at: datetime | None = None) -> bool:
    """A shutdown interrupted this run: queue the job again, attempt not counted.

    ``started_at``: only the run that started then (a hand-back replayed later,
    jobs/handbacks.py: the attempt number alone comes back after a hand-back).
    """
    fence = _FENCED if started_at is None else and_(_FENCED, jobs.c.started_at == bindparam("p_started"))
    return _fenced_update(update(jobs).where(fence).values(
        status=QUEUED, attempts=jobs.c.attempts - 1, started_at=None, lease_until=None,
        lapsed_at=None, queued_at=utcnow()), job_id, attempt,
        **({} if started_at is None else {"p_started": started_at}))


def sweep_stranded(*, queued_lease: float, confirm_after: float) -> list[str]:
    """Jobs to (re)publish now: taken back from a dead run, lost in the queue, or never published.

    * ``running`` with a lapsed lease: the first sweep that sees it only marks
      it (``lapsed_at``); a sweep at least ``confirm_after`` seconds later
      (one renewal period) that sees it still lapsed and still marked takes it
      back to ``queued``, the attempt counted. A live lease keeper renews in
      between and clears the mark.
    * ``queued`` and not started for ``queued_lease`` (its message was lost):
      the timer is reset.
    * ``queued`` with ``unpublished_since`` set (the broker was down): as is;
      the caller clears the mark once the message is out (:func:`mark_published`).

    The caller publishes every id returned; a duplicate message is harmless
    because :func:`claim` lets only one run start.
    """
    now = utcnow()
    lapsed = and_(jobs.c.status == RUNNING, jobs.c.lease_until < now)
    with db.transaction() as conn:
        taken_back = conn.execute(
            update(jobs).where(lapsed, jobs.c.lapsed_at <= now - timedelta(seconds=confirm_after))
            .values(status=QUEUED, queued_at=now, lease_until=None, lapsed_at=None)
            .returning(jobs.c.id)).scalars().all()
        conn.execute(update(jobs).where(lapsed, jobs.c.lapsed_at.is_(None)).values(lapsed_at=now))
        lost = conn.execute(
            update(jobs).where(jobs.c.status == QUEUED,
                               jobs.c.queued_at < now - timedelta(seconds=queued_lease))
            .values(queued_at=now).returning(jobs.c.id)).scalars().all()
        unpublished = conn.execute(select(jobs.c.id).where(
            jobs.c.status == QUEUED, jobs.c.unpublished_since.is_not(None))).scalars().all()
    return list(dict.fromkeys([*taken_back, *lost, *unpublished]))


def mark_unpublished(job_ids: list[str]) -> None:
    """These queued jobs' messages could not be published: the sweeper republishes them."""
    if job_ids:
        with db.transaction() as conn:
            conn.execute(update(jobs).where(jobs.c.id.in_(job_ids), jobs.c.status == QUEUED,
                                            jobs.c.unpublished_since.is_(None))
                         .values(unpublished_since=utcnow()))


def mark_published(job_ids: list[str]) -> None:
    """These jobs' messages are on the broker now."""
    if job_ids:
        with db.transaction() as conn:
            conn.execute(update(jobs).where(jobs.c.id.in_(job_ids), jobs.c.unpublished_since.is_not(None))
                         .values(unpublished_since=None))


def public(job: dict[str, Any]) -> dict[str, Any]:
    """The API's view of a job: ISO 8601 UTC times, no internal fields."""
    out = {k: job[k] for k in PUBLIC_FIELDS}
    for key in ("created_at", "started_at", "finished_at"):
        if out[key] is not None:
            out[key] = out[key].isoformat(timespec="milliseconds") + "Z"
    return out
