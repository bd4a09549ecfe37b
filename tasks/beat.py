"""Celery beat's scheduler, with this project's shutdown sequence.

Beat has no shutdown signal of its own. Its SIGTERM/SIGINT handler (Celery's
``install_sync_handler``) syncs the schedule (logging, in the handler) and
raises SystemExit; the service then calls ``scheduler.close()`` again. Ours
only records the signal and raises SystemExit; beat's loop, unwinding, calls
``close()``, routed through the shutdown registry, which logs the signal and
closes, out of signal context. So the schedule store is synced
(``last_run_at`` saved: a restart neither repeats nor skips a run) and the
broker connection released exactly once, with the same log lines as every
other process. SIGKILL would lose up to ``beat_sync_every`` runs' state.

Beat also runs the stranded-job sweep, in a thread (jobs/sweeper.py): the
schedule's ``requeue-stranded-jobs`` entry wakes that thread instead of
sending a message the busy queue could starve. And beat survives a full
disk: a schedule store that cannot be written is logged and written again
at the next sync (its store lives in VAR_DIR, beside SQLite and Redis).
"""

from __future__ import annotations

import functools
import logging
import signal
from pathlib import Path

from celery.beat import PersistentScheduler

from app import budget, shutdown
from core import broker, logs
from jobs import sweeper

log = logging.getLogger("celery.beat")

#: The sweeper's stop, the schedule store's sync and the connections' close, together, at most.
CLOSE_BUDGET = 1.5


class Scheduler(PersistentScheduler):
    def setup_schedule(self) -> None:
        logs.set_role("beat")
        shutdown.stop_with_parent()
        shutdown.enable_stack_dumps()
        budget.announce()
        # Beat may be first up on a fresh machine: nothing else has made var/ yet.
        Path(self.schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()
        registry = shutdown.current()
        registry.register("celery broker connections", broker.close_celery_connections)
        registry.register("beat schedule store and connection",
                          functools.partial(PersistentScheduler.close, self))
        self.sweeper = sweeper.Sweeper()
        self.sweeper.start(registry)  # registered last: stopped first
        # Celery leaves SIGQUIT at its default (die at once, the schedule's
        # last runs unsaved); supervisord and `honcho export` stop with it: same as SIGTERM.
        for signum in shutdown.STOP_SIGNALS:
            signal.signal(signum, functools.partial(_stop, registry))

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

    def close(self) -> None:
        shutdown.current().close_all(budget=CLOSE_BUDGET)


def _stop(registry: shutdown.ShutdownRegistry, signum: int, _frame: object) -> None:
    """Beat's handler of SIGTERM, SIGINT and SIGQUIT: record the first one and leave beat's loop.

    Signal context: no logging, no lock (the main thread may hold one). It
    raises SystemExit as Celery's own handler does (beat's loop sleeps in
    ``time.sleep``, which only an exception ends early); beat's loop catches
    it and calls ``close()``: the registry then logs "signal received" and
    closes, out of the handler. Repeats are ignored: a second SystemExit
    (the parent-death signal comes once per thread of the dying parent; an
    impatient Ctrl+C) would land in the middle of that close.
    """
    if registry.recorded_signal is not None:
        return
    registry.record_signal(signum)
    raise SystemExit(0)
