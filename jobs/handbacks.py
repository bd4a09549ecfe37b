"""Hand-backs the ledger could not take at a stop, done when the job's message comes again.

A pool child handing its job back at a stop writes ``running`` -> ``queued``
to the ledger before the MainProcess's SIGKILL. With the database frozen or
away that write fails in time (core/db.py), and the message is requeued
anyway; but the row stays ``running``, so the next delivery finds the job
"running elsewhere" and drops the message, and the job waited for the
sweeper: its lease, then two sweeps (60 s by default).

The child knows what the database could not be told: its run is over. It
records the run here (``VAR_DIR/handed-back.jsonl``: job, attempt and the
run's ``started_at``). When a delivery finds the job not claimable, the
record is replayed: the same hand-back, fenced on that very run (its
attempt and its start), so it can only ever undo a run that is over, never
a later one. Then the job is claimed as usual.

What this does not cover: a message delivered to a worker on another
machine (its own ``VAR_DIR``), or a ``VAR_DIR`` that did not survive (a new
container). The sweeper takes such a job back after its lease, as before;
a shorter ``JOB_LEASE_SECONDS`` shortens that wait, at the price of more
renewals (the sweeper cannot tell a dead run from a live one that cannot
renew, so it must wait out the lease).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from core.config import get_settings
from jobs import ledger
from stopright.requeue import Spool

SPOOL_NAME = "handed-back.jsonl"


def spool() -> Spool:
    return Spool(Path(get_settings().data_dir) / SPOOL_NAME)


def record(job_id: str, attempt: int, started_at: datetime) -> Path:
    """This run of the job is over, handed back, though the ledger could not be told; the spool's path."""
    handed = spool()
    handed.add({"job": job_id, "attempt": attempt, "started_at": started_at.isoformat()})
    return handed.path


def replay(job_id: str) -> bool:
    """Do the recorded hand-backs of ``job_id`` (each fenced on its run); True if the job is queued again.

    A record whose run is no longer the job's (the sweeper took it back, or
    the record was replayed already) changes nothing and is dropped; a
    database error keeps the records for the next delivery.
    """
    handed = spool()
    if not handed.path.exists():
        return False
    done = False
    with handed.locked() as entries:
        for entry in [e for e in entries if e.get("job") == job_id]:
            done |= ledger.hand_back(job_id, entry["attempt"],
                                     started_at=datetime.fromisoformat(entry["started_at"]))
            entries.remove(entry)
    return done
