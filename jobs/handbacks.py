"""Hand-backs the ledger could not take at a stop, done when the job's message comes again.

A pool child handing its job back at a stop writes ``running`` -> ``queued``
to the ledger before the MainProcess's SIGKILL. With the database frozen,
away or slow that write fails in time (core/db.py), and the row stays
``running``: the next delivery would find the job "running elsewhere" and
drop the message, and the job would wait for the sweeper (its lease, then
two sweeps).

The child knows what the database could not be told: its run is over. It
records the run (job, attempt and the run's ``started_at``) twice:

* **in a new message** for the job (:func:`carried`), published in place of
  the requeue, so the worker that takes it next, on any host, replays it;
* **in this host's spool** (``VAR_DIR/handed-back.jsonl``), first, for when
  that publish cannot be made before the SIGKILL (the broker away too): the
  original message is requeued and a delivery here replays the record.

A replay is the same hand-back, fenced on that very run (its attempt and its
start), so it only ever undoes a run that is over, never a later one. Then
the job is claimed as usual. A delivery elsewhere of a requeued message
with no record (both the ledger and the broker out of reach at the stop)
still waits for the sweeper.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from core.config import get_settings
from jobs import ledger
from stopright.requeue import Spool

SPOOL_NAME = "handed-back.jsonl"


def spool() -> Spool:
    return Spool(Path(get_settings().data_dir) / SPOOL_NAME)


def carried(attempt: int, started_at: datetime) -> dict[str, Any]:
    """The record of a run handed back, as a job's message carries it (``handed_back``)."""
    return {"attempt": attempt, "started_at": started_at.isoformat()}


def record(job_id: str, attempt: int, started_at: datetime) -> Path:
    """This run of the job is over, handed back, though the ledger could not be told; the spool's path."""
    handed = spool()
    handed.add({"job": job_id, **carried(attempt, started_at)})
    return handed.path


def forget(job_id: str, attempt: int) -> None:
    """Drop this run's spool record: a new message carries it (the spool would keep it for good)."""
    with spool().locked() as entries:
        entries[:] = [e for e in entries if (e.get("job"), e.get("attempt")) != (job_id, attempt)]


def _undo(job_id: str, run: dict[str, Any]) -> bool:
    return ledger.hand_back(job_id, run["attempt"], started_at=datetime.fromisoformat(run["started_at"]))


def replay(job_id: str, message: dict[str, Any] | None = None) -> bool:
    """Do the hand-backs of ``job_id`` its ``message`` carries or the spool holds; True if it is queued again.

    Each is fenced on its run: one whose run is no longer the job's (the
    sweeper took it back, or it was replayed already) changes nothing, and a
    spool record is then dropped; a database error keeps the records for the
    next delivery.
    """
    done = message is not None and _undo(job_id, message)
    handed = spool()
    if not handed.path.exists():
        return done
    with handed.locked() as entries:
        for entry in [e for e in entries if e.get("job") == job_id]:
            done |= _undo(job_id, entry)
            entries.remove(entry)
    return done
