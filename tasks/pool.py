"""Celery's prefork pool, minus half a second of every stop.

Celery 5.7's ``TaskPool.on_stop`` keeps firing the event loop's timers (acks,
heartbeats) in a thread while the pool drains. That thread sleeps 0.5 s
between passes and is joined after the drain, so every warm shutdown, idle
or busy, waits up to half a second longer than its work. This copy of
``on_stop`` is Celery's own with one change: the thread waits on its stop
event instead of sleeping, so it ends the moment the pool has drained.
Selected by ``worker_pool`` in tasks/celery_app.py; revisit on a Celery
upgrade (the e2e tests time nothing, scripts/bench does).
"""

from __future__ import annotations

import logging
import threading

from billiard.pool import CLOSE, RUN
from celery.concurrency import prefork
from kombu.asynchronous import get_event_loop

logger = logging.getLogger("celery.concurrency.prefork")

TIMER_PERIOD = 0.5  # Celery's; no longer a floor on the stop


class TaskPool(prefork.TaskPool):
    def on_stop(self) -> None:
        """Gracefully stop the pool (warm shutdown)."""
        if self._pool is None or self._pool._state not in (RUN, CLOSE):
            return
        self._pool.close()
        hub = get_event_loop()
        if hub is None:
            self._pool.join()
            self._pool = None
            return

        drained = threading.Event()

        def fire_timers_loop() -> None:
            while not drained.is_set():
                try:
                    hub.fire_timers()
                    prefork._run_ready_callbacks(hub)
                except Exception:
                    logger.warning("Exception in timer thread during prefork on_stop()", exc_info=True)
                drained.wait(TIMER_PERIOD)  # Celery: time.sleep(0.5)

        timer_thread = threading.Thread(target=fire_timers_loop, daemon=True,
                                        name="prefork-timer-shutdown")
        timer_thread.start()
        try:
            self._pool.join()
        finally:
            drained.set()
            timer_thread.join(timeout=1.0)
            if timer_thread.is_alive():
                logger.warning("Timer thread in prefork on_stop() did not terminate cleanly")
            else:
                # The results the join waited for queued their acks after the thread's last pass.
                try:
                    prefork._run_ready_callbacks(hub)
                except Exception:
                    logger.warning("Exception running ready callbacks after prefork pool join",
                                   exc_info=True)
        self._pool = None
