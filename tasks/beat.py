"""Celery beat's scheduler, with this project's shutdown sequence.

Beat has no shutdown signal of its own. Its SIGTERM/SIGINT handler (Celery's
``install_sync_handler``) syncs the schedule and raises SystemExit; the
service then calls ``scheduler.close()`` again. We log the signal, and route
``close()`` through the shutdown registry, so the schedule store is synced
(``last_run_at`` saved: a restart neither repeats nor skips a run) and the
broker connection released exactly once, with the same log lines as every
other process. SIGKILL would lose up to ``beat_sync_every`` runs' state.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

from celery.beat import PersistentScheduler

from app import broker, logs, shutdown


class Scheduler(PersistentScheduler):
    def setup_schedule(self) -> None:
        logs.set_role("beat")
        shutdown.stop_with_parent()
        # Beat may be first up on a fresh machine: nothing else has made var/ yet.
        Path(self.schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()
        registry = shutdown.current()
        registry.register("celery broker connections", broker.close_celery_connections)
        registry.register("beat schedule store and connection",
                          functools.partial(PersistentScheduler.close, self))
        for signum in (signal.SIGTERM, signal.SIGINT):
            _first_only(signum, registry)

    def close(self) -> None:
        shutdown.current().close_all()


def _first_only(signum: int, registry: shutdown.ShutdownRegistry) -> None:
    """Log the first stop signal, then run Celery's sync handler; ignore repeats.

    Celery's handler syncs the store and raises SystemExit. A second signal
    (the parent-death signal comes once per thread of the dying parent; an
    impatient Ctrl+C) would raise SystemExit again in the middle of that
    sync. The first one is enough.
    """
    celery_handler = signal.getsignal(signum)

    def handler(sig: int, frame: object) -> None:
        if registry.shutting_down.is_set():
            return
        registry.signal_received(sig)
        if callable(celery_handler):
            celery_handler(sig, frame)

    signal.signal(signum, handler)
