"""The stranded-job sweep, run by beat in a thread of its own: never starved by a busy queue.

Stranded: a job whose run died (its lease lapsed on two sweeps a renewal
period apart), whose message was lost (queued and not started for
``JOB_QUEUED_LEASE_SECONDS``), or whose message never went out (stored while
the broker was down, ``unpublished_since``). ``ledger.sweep_stranded`` finds
them; :func:`sweep_once` republishes them.

Why beat runs it, in a thread: the sweep used to be a Celery task that beat
sent into the ``jobs`` queue, with ``expires`` = the interval. With every pool
child busy it waited behind the jobs and expired unrun ("Discarding revoked
task"), so stranded jobs waited for the backlog to clear. A queue
of its own would not help: a prefork worker sets no child aside for a queue.
Beat is the one process of the set that is single by design (on several
hosts only the leader lease's holder schedules: core/leader.py), does
nothing else, and already wakes on the sweep's schedule (the
``requeue-stranded-jobs`` entry, core/celery_app.py),
so a due entry wakes this thread instead of sending a message. A thread, so
that a database that does not answer never stalls beat's loop or its stop
(the stop waits :data:`STOP_SECONDS` at most, then abandons it). The price:
beat loads SQLAlchemy and the ledger and holds one database connection
(docs/benchmarks.md, "Where the memory goes").

The sweep survives any error: the database or the broker away is logged once
per outage and the next sweep tries again.
"""

from __future__ import annotations

import logging
import threading

from core import db, outages
from core.config import get_settings
from jobs import ledger, outbox
from stopright.registry import ShutdownRegistry

log = logging.getLogger("sweeper")

#: The beat schedule entry's task name: beat hands it to this thread (tasks/beat.py).
TASK_NAME = "jobs.requeue_stranded"
#: How long beat's stop waits for a sweep in flight.
STOP_SECONDS = 1.0


def sweep_once() -> int:
    """One sweep: republish every stranded job; the number published."""
    settings = get_settings()
    ids = ledger.sweep_stranded(queued_lease=settings.job_queued_lease_seconds,
                                confirm_after=settings.job_lease_seconds / ledger.RENEWALS_PER_LEASE)
    published: list[str] = []
    for index, job_id in enumerate(ids):
        try:
            outbox.publish(job_id)
        except Exception as exc:  # noqa: BLE001 - the broker is down: keep them for the next sweep
            unpublished = ids[index:]
            ledger.mark_unpublished(unpublished)
            log.warning("%d stranded job(s) not published (%s: %s); the next sweep tries again",
                        len(unpublished), type(exc).__name__, exc)
            break
        published.append(job_id)
    if published:
        ledger.mark_published(published)
        log.warning("requeued %d stranded job(s): %s", len(published), ", ".join(published))
    return len(published)


class Sweeper:
    """Beat's sweeper thread: one sweep each time beat's schedule says so (:meth:`wake`)."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self, registry: ShutdownRegistry) -> None:
        # The engine first, so the registry (newest first) stops this thread before it closes
        # the database the thread uses.
        db.get_engine()
        self._thread.start()
        registry.register("stranded-job sweeper", self.stop, timeout=STOP_SECONDS + 0.5)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(STOP_SECONDS)

    def _run(self) -> None:
        failing = schema_ready = False
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if not schema_ready:  # beat may be first up on a fresh database
                    ledger.ensure_schema()
                    schema_ready = True
                sweep_once()
            except Exception as exc:  # noqa: BLE001 - an outage or a bug: log it, sweep again next time
                kind = outages.database_outage(exc)
                if kind is None:
                    log.exception("sweep failed")
                elif not failing:
                    log.warning("sweep skipped: database %s (%s); retrying at each sweep", kind,
                                type(exc).__name__)
                failing = kind is not None
                continue
            if failing:
                log.warning("sweeping again: the database answers")
                failing = False
