"""What the ledger tests share (test_ledger*.py, test_jobs.py, test_handbacks.py, test_sweeper.py).

Each needs the ``schema`` fixture (tests/unit/conftest.py): a jobs table in this test's SQLite file.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from core.db import get_engine
from jobs import ledger

LEASE = 30.0
MAX = 5


def new_job(task: str = "sleep", args: dict | None = None) -> str:
    return ledger.create(task, {"seconds": 1.0} if args is None else args)["id"]


def set_row(job_id: str, **values) -> None:
    with get_engine().begin() as conn:
        conn.execute(update(ledger.jobs).where(ledger.jobs.c.id == job_id).values(**values))


def claimed(job_id: str, *, lease: float = LEASE, max_attempts: int = MAX) -> dict:
    job = ledger.claim(job_id, lease=lease, max_attempts=max_attempts)
    assert job is not None
    return job


def expire_lease(job_id: str) -> None:
    set_row(job_id, lease_until=ledger.utcnow() - timedelta(seconds=1))


def sweep(*, queued_lease: float = 60, confirm_after: float = 0) -> list[str]:
    return ledger.sweep_stranded(queued_lease=queued_lease, confirm_after=confirm_after)


def take_back(job_id: str) -> None:
    """The sweeper takes a dead run's job back: its lease seen lapsed on two sweeps."""
    assert job_id not in sweep()
    assert job_id in sweep()


def unreachable(what: str = "connection refused") -> Exception:
    """What SQLAlchemy raises when the database server is away."""
    import psycopg
    from sqlalchemy import exc

    return exc.OperationalError("UPDATE jobs ...", {}, psycopg.OperationalError(what))


def flaky(monkeypatch, name: str, failures: int, error: Exception | None = None) -> list[int]:
    """Make ``ledger.<name>`` raise ``error`` (the database away) its first ``failures`` calls."""
    real, calls = getattr(ledger, name), []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) <= failures:
            raise error or unreachable()
        return real(*args, **kwargs)

    monkeypatch.setattr(ledger, name, call)
    return calls
