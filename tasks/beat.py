"""Celery beat's scheduler: stopright's stop, plus this app's sweeper thread.

What happens on SIGTERM in beat: stopright/celery_beat.py (the signal is
recorded, beat's loop unwinds, the registry closes the sweeper, releases
the leader lease, closes the schedule store and the connections, and logs it). SIGKILL would lose up to
``beat_sync_every`` runs' state.

Beat also runs the stranded-job sweep, in a thread (jobs/sweeper.py): the
schedule's ``requeue-stranded-jobs`` entry wakes that thread instead of
sending a message the busy queue could starve. And beat survives a full
disk: a schedule store that cannot be written is logged and written again
at the next sync (its store lives in VAR_DIR, beside SQLite and Redis).

Beat on several hosts (or two for a moment in a rollout): only the holder of
the leader lease schedules, the sweep included (core/leader.py); the others
stand by and one takes over when it stops or dies.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from celery.beat import PersistentScheduler

from core import leader, logs
from core.config import get_settings
from jobs import sweeper
from stopright import registry
from stopright.celery_beat import StopRightBeat
from stopright.registry import STOP_SIGNALS

log = logging.getLogger("celery.beat")

#: How often a standby beat's loop checks whether its lease keeper took over (no database call).
STANDBY_TICK = 0.2


def adopt(schedule: Mapping[str, Any], recorded: Mapping[str, datetime]) -> list[str]:
    """Start each entry from its recorded run where that is later than this host's own; the names moved.

    A local ``last_run_at`` counts only once the entry ran here
    (``total_run_count``): Celery stamps a new entry with the time it was
    created, which is no run.
    """
    moved = []
    for name, entry in schedule.items():
        at = recorded.get(name)
        if at is None:
            continue
        at = at.replace(tzinfo=UTC)
        local = entry.last_run_at
        local = local.replace(tzinfo=UTC) if local.tzinfo is None else local
        if not entry.total_run_count or local < at:
            entry.last_run_at = at
            moved.append(name)
    return moved


#: How long a stop signal waits for the sends of the tick in hand (a broker that does not answer).
SEND_WAIT_SECONDS = 1.0


class StopAfterSends:
    """A stop signal in a tick takes effect once its runs are sent, or after :data:`SEND_WAIT_SECONDS`.

    Beat's stop handler raises SystemExit wherever the main thread is. In a
    send, a message half-written or written and not yet recorded for the
    next leader made it repeat or skip the run. A send that takes longer (the
    broker away: Celery's publish retries) is cut by SIGALRM: the stop stays
    bounded.
    """

    def __enter__(self) -> StopAfterSends:
        self.caught: tuple[int, Any] | None = None
        self.previous: dict[int, Any] | None = None
        self.alarm: tuple[float, float, float] | None = None  # one armed before ours: left, interval, when
        if threading.current_thread() is threading.main_thread():  # not beat embedded in a thread
            self.previous = {signum: signal.signal(signum, self._defer) for signum in STOP_SIGNALS}
            self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._give_up)
        return self

    def __exit__(self, *_: object) -> None:
        self._restore()

    def _defer(self, signum: int, frame: Any) -> None:
        if self.caught is None:
            self.caught = (signum, frame)
            self.alarm = (*signal.setitimer(signal.ITIMER_REAL, SEND_WAIT_SECONDS), time.monotonic())

    def _give_up(self, _signum: int, _frame: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        """The handlers back; the stop signal caught meanwhile, now (beat's handler raises SystemExit)."""
        if self.previous is None:
            return
        if self.alarm is not None:  # ours off; another's (pytest-timeout's ...) back as it was
            left, interval, armed = self.alarm
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - armed), 1e-3) if left else 0,
                             interval)
        previous, self.previous = self.previous, None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if self.caught is not None:
            signum, frame = self.caught
            if callable(previous[signum]):
                previous[signum](signum, frame)
            elif previous[signum] == signal.SIG_DFL:
                signal.raise_signal(signum)


class Scheduler(StopRightBeat, PersistentScheduler):
    #: The sweeper's stop, the lease's release, the store's sync and the connections' close, at most.
    close_budget = 1.5

    def setup_schedule(self) -> None:
        logs.set_role("beat")
        super().setup_schedule()  # stopright: follow the manager, stop signals, what to close
        lease = leader.Lease("beat", leader.holder_id(), get_settings().beat_lease_seconds)
        self.leader = leader.Leader(lease)
        self.leader.start(registry.current())  # released before the database closes
        self._term = 0  # the lease's term this schedule last started from
        self.sweeper = sweeper.Sweeper()
        self.sweeper.start(registry.current())  # registered last: stopped first

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Schedule only while leading; on taking over, start from the runs the leaders recorded.

        Relies on Celery's ``Scheduler.tick``: it sends what is due and
        returns the seconds until the next due entry, and it rebuilds its
        heap (the entries' next times) only when ``_heap`` is None.
        """
        if not self.leader.leading:
            return min(STANDBY_TICK, self.max_interval)
        if self._term != self.leader.term:
            self._term = self.leader.term
            moved = adopt(self.schedule, self.leader.recorded)
            if moved:
                log.info("beat: schedule taken from the recorded runs of %s", ", ".join(sorted(moved)))
            self._heap = None  # Celery's: rebuilt from the entries at the next tick
        with StopAfterSends():
            return super().tick(*args, **kwargs)

    def reserve(self, entry):
        """Record each run in the database as Celery reserves it (before sending): the next leader's start.

        Celery's ``tick`` calls ``reserve`` (the entry's next state, its
        ``last_run_at`` now) just before ``apply_entry``.
        """
        new_entry = super().reserve(entry)
        self.leader.record(new_entry.name, new_entry.last_run_at)
        return new_entry

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
