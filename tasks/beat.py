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

from celery.beat import PersistentScheduler

from app import logs, shutdown
from tasks.celery_app import celery_app


class Scheduler(PersistentScheduler):
    def setup_schedule(self) -> None:
        logs.set_role("beat")
        shutdown.stop_with_parent()
        super().setup_schedule()
        registry = shutdown.current()
        registry.register("celery broker connections", celery_app.close)
        registry.register("beat schedule store and connection",
                          functools.partial(PersistentScheduler.close, self))
        for signum in (signal.SIGTERM, signal.SIGINT):  # Celery's sync handler follows
            shutdown.chain_signal(signum, registry.signal_received)

    def close(self) -> None:
        shutdown.current().close_all()
