"""Celery beat's scheduler: stopright's stop, plus this app's sweeper thread.

What happens on SIGTERM in beat: stopright/celery_beat.py (the signal is
recorded, beat's loop unwinds, the registry closes the sweeper, the
schedule store and the connections, and logs it). SIGKILL would lose up to
``beat_sync_every`` runs' state.

Beat also runs the stranded-job sweep, in a thread (jobs/sweeper.py): the
schedule's ``requeue-stranded-jobs`` entry wakes that thread instead of
sending a message the busy queue could starve. And beat survives a full
disk: a schedule store that cannot be written is logged and written again
at the next sync (its store lives in VAR_DIR, beside SQLite and Redis).
"""

from __future__ import annotations

import logging

from celery.beat import PersistentScheduler

from core import logs
from jobs import sweeper
from stopright import registry
from stopright.celery_beat import StopRightBeat

log = logging.getLogger("celery.beat")

class Scheduler(StopRightBeat, PersistentScheduler):
    #: The sweeper's stop, the schedule store's sync and the connections' close, together, at most.
    close_budget = 1.5

    def setup_schedule(self) -> None:
        logs.set_role("beat")
        super().setup_schedule()  # stopright: follow the manager, stop signals, what to close
        self.sweeper = sweeper.Sweeper()
        self.sweeper.start(registry.current())  # registered last: stopped first

    @property
    def producer(self) -> None:
        """No producer of beat's own: its one entry sends no message (the sweep runs in beat).

        Celery's scheduler opens one on the first due entry and retries its
        connection for as long as the broker is down or refusing writes
        (``broker_connection_max_retries=None``), with beat's loop, and so
        the sweep, stalled meanwhile. The sweeper publishes through the app's
        producer pool instead, closed with "celery broker connections".
        """
        return None

    def apply_entry(self, entry, producer=None) -> None:
        """The sweep's entry wakes beat's sweeper thread; any other entry is sent as usual."""
        if entry.task != sweeper.TASK_NAME:
            return super().apply_entry(entry, producer=producer)
        log.info("Scheduler: Sending due task %s (%s) to the sweeper thread", entry.name, entry.task)
        self.sweeper.wake()
        return None

    def sync(self) -> None:
        """Save the schedule; a store that cannot be written (disk full) is retried at the next sync."""
        try:
            super().sync()
        except Exception as exc:  # noqa: BLE001 - a crash here stopped beat and, with it, the set
            log.warning("schedule store not saved (%s: %s); retried at the next sync",
                        type(exc).__name__, exc)
