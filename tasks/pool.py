"""Celery's prefork pool, minus the fixed sleeps and the hang in its warm shutdown.

Two sleeps in Celery 5.7 make every warm shutdown last longer than its work,
and a dropped result can hold it for 30 s (``ResultHandler.on_stop_not_started``):

* ``TaskPool.on_stop`` keeps firing the event loop's timers (acks,
  heartbeats) in a thread while the pool drains. The thread sleeps 0.5 s
  between passes and is joined after the drain: up to 0.5 s more, idle or
  busy. Here it waits on its stop event instead, so it ends with the drain.
* While draining, ``ResultHandler._flush_outqueue`` checks each child's
  result pipe and sleeps 0.5 s when nothing is there yet. A job finishing
  just after the check waits out the sleep, and so does its pool child:
  billiard keeps the child alive until the parent has read its result.
  Here the check waits on the pipe itself, briefly, so a result is read
  as soon as it is written.

All three methods are Celery's own code with only that change. Selected by
``worker_pool`` in core/celery_app.py; revisit on a Celery upgrade.
"""

from __future__ import annotations

import logging
import threading

from billiard.compat import setblocking
from billiard.pool import CLOSE, RUN, TERMINATE, WorkersJoined
from celery.concurrency import asynpool, prefork
from kombu.asynchronous import get_event_loop

logger = logging.getLogger("celery.concurrency.prefork")

TIMER_PERIOD = 0.5  # Celery's; no longer a floor on the stop
RESULT_WAIT = 0.02  # per child pipe and pass while draining (Celery: poll, then sleep 0.5)


class ResultHandler(asynpool.ResultHandler):
    def on_stop_not_started(self):
        """Read the children's results until every child has exited (Celery: until none is pending).

        At the warm shutdown Celery's ``AsynPool.flush`` drops from its cache
        every job whose ACK it has not read yet, although the job may already
        be written to a child, running or run. Celery then stops reading
        results as soon as the cache is empty, while that child waits (up to
        30 s, billiard's ``_ensure_messages_consumed``) for the parent to read
        the result it sent: under load, 4 stops in 5 ended with a child stuck
        there and the MainProcess in ``Pool.join`` (measured). Reading until
        the children have exited lets them go at once. The result of such a
        dropped job is harmless: its message was never acknowledged, so the
        broker delivers it again and the ledger's claim drops it.
        """
        check_timeouts = self.check_timeouts
        fileno_to_outq = self.fileno_to_outq
        on_state_change = self.on_state_change
        join_exited_workers = self.join_exited_workers

        outqueues = set(fileno_to_outq)
        while outqueues and self._state != TERMINATE:  # Celery: while cache and outqueues and ...
            if check_timeouts is not None:
                check_timeouts()
            pending_remove_fd = set()
            for fd in outqueues:
                asynpool.iterate_file_descriptors_safely(
                    [fd], self.fileno_to_outq, self._flush_outqueue,
                    pending_remove_fd.add, fileno_to_outq, on_state_change)
                try:
                    join_exited_workers(shutdown=True)
                except WorkersJoined:
                    return
            outqueues.difference_update(pending_remove_fd)

    def _flush_outqueue(self, fd, remove, process_index, on_state_change):
        try:
            proc = process_index[fd]
        except KeyError:
            # process already found terminated: its outqueue was processed
            # by the worker lost handler.
            return remove(fd)

        if self._finish_partial_read(fd, proc):
            return remove(fd)

        reader = proc.outq._reader
        try:
            setblocking(reader, 1)
        except OSError:
            return remove(fd)
        result = None
        try:
            # Celery: ``if reader.poll(0): recv() else: sleep(0.5)``.
            task = reader.recv() if reader.poll(RESULT_WAIT) else None
        except (OSError, EOFError):
            result = remove(fd)
        else:
            if task:
                on_state_change(task)
        finally:
            try:
                setblocking(reader, 0)
            except OSError:
                result = remove(fd)
        return result


class AsynPool(asynpool.AsynPool):
    ResultHandler = ResultHandler


class TaskPool(prefork.TaskPool):
    Pool = AsynPool

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
