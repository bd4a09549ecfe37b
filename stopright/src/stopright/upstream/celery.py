"""Celery's worker internals: the prefork pool's warm shutdown, the consumer, the worker's state.

**The pool** (:class:`TaskPool`, selected by ``worker_pool``). Two sleeps in
Celery 5.7 make every warm shutdown last longer than its work, and a dropped
result can hold it for 30 s (``ResultHandler.on_stop_not_started``):

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

All three methods are Celery's own code with only that change; their
upstream digests are pinned (:data:`DIGESTS`). The pool's children exit
without billiard's one-second sleep (stopright/upstream/billiard.py).

**The consumer** is in stopright/upstream/celery_consumer.py.

**The worker's state**: the running requests, and Celery's own warm
shutdown (``state.should_stop``), read and set only here.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from billiard.compat import setblocking
from billiard.pool import CLOSE, RUN, TERMINATE, WorkersJoined
from celery import _state
from celery.concurrency import asynpool, prefork
from celery.exceptions import WorkerShutdown
from celery.platforms import EX_OK
from celery.worker import state
from celery.worker.control import control_command
from kombu.asynchronous import get_event_loop

from stopright.upstream.billiard import QuickExit
from stopright.upstream.cpython import weakset_snapshot

#: What this module relies on that Celery does not promise (checked by tests/unit/test_upstream_shapes.py).
STOP_HANDLERS = "celery.apps.worker.Worker.on_start: self.install_platform_tweaks(self), its stop handlers"
REACHES = {
    STOP_HANDLERS: (
        "wrapped on the instance: stopright's stop handlers replace Celery's as soon as it installs them"),
    "celery.concurrency.asynpool.ResultHandler.on_stop_not_started": "copied, reads until children exit",
    "celery.concurrency.asynpool.ResultHandler._flush_outqueue": "copied, waits on the pipe, no sleep",
    "celery.concurrency.prefork.TaskPool.on_stop": "copied, the timer thread waits on an event",
    "celery.concurrency.prefork._run_ready_callbacks": "called by the on_stop copy",
    "celery.concurrency.asynpool.AsynPool.ResultHandler / .Worker": "class attributes we replace",
    "celery.concurrency.prefork.TaskPool.Pool": "the pool class on_start builds (ours, with the event loop)",
    "billiard.pool CLOSE / RUN / TERMINATE / WorkersJoined, billiard.compat.setblocking":
        "used by the copies",
    "celery.concurrency.asynpool.iterate_file_descriptors_safely": "called by the copy",
    "celery.apps.beat.Beat.install_sync_handler / Celery.Beat (a cached property)":
        "replaced by a no-op for the app's beat (beat_without_sync_handler)",
    "celery.beat.Service.start / sync":
        "beat's loop ends on SystemExit and calls scheduler.close() (stopright/celery_beat.py)",
    "celery.worker.state.should_stop": "set to 0: Celery's warm shutdown",
    "celery.worker.state.active_requests": "the requests a pool child is running (a WeakSet)",
    "celery.worker.request.Request.worker_pid": "which pool child runs a request",
    "celery.worker.control: the 'shutdown' command": "replaced by a bounded one (same name, Panel.data)",
    "celery._state._get_active_apps / _tls.current_app / Celery._after_fork":
        "each app's pools reset after os.fork",
    "celery.app.trace.build_tracer: a task class's own __call__ is called (task_has_custom)":
        "stopright/handback.py HandBackTask.__call__ wraps each run (Celery calls run() directly otherwise)",
    "celery.backends.database.DatabaseBackend.session_manager.invalidate(url)":
        "disposes the pooled engine a forked pool child keeps for the result backend (result_backend_close)",
    "celery.app.trace logger: a task's Reject is logged there, with its traceback":
        "stopright/handback.py QuietHandBack drops a hand-back's traceback there (TRACE_LOGGER)",
}
#: Digests (stopright.upstream.source_digest) of the Celery 5.7.0 methods copied here.
DIGESTS = {
    "celery.concurrency.asynpool.ResultHandler.on_stop_not_started": "c5f0c4cc9926b96a",
    "celery.concurrency.asynpool.ResultHandler._flush_outqueue": "774c11a77094772d",
    "celery.concurrency.prefork.TaskPool.on_stop": "01960c64b9a350a4",
}

logger = logging.getLogger("celery.concurrency.prefork")
#: Where Celery logs a task's outcome, a ``Reject`` with its traceback among them.
TRACE_LOGGER = "celery.app.trace"

TIMER_PERIOD = 0.5  # Celery's; no longer a floor on the stop
RESULT_WAIT = 0.02  # per child pipe and pass while draining (Celery: poll, then sleep 0.5)


class ResultHandler(asynpool.ResultHandler):
    def on_stop_not_started(self) -> None:
        """Read the children's results until every child has exited (Celery: until none is pending).

        At the warm shutdown Celery's ``AsynPool.flush`` drops from its cache
        every job whose ACK it has not read yet, although the job may already
        be written to a child, running or run. Celery then stops reading
        results as soon as the cache is empty, while that child waits (up to
        30 s, billiard's ``_ensure_messages_consumed``) for the parent to read
        the result it sent: under load, 4 stops in 5 ended with a child stuck
        there and the MainProcess in ``Pool.join`` (measured). Reading until
        the children have exited lets them go at once. The result of such a
        dropped job is not lost: its message was never acknowledged, so the
        broker delivers it again. The task may then run twice (at least once,
        as with every ``acks_late`` task: make tasks idempotent; the demo's
        ledger claim drops the second run).
        """
        check_timeouts = self.check_timeouts
        fileno_to_outq = self.fileno_to_outq
        on_state_change = self.on_state_change
        join_exited_workers = self.join_exited_workers

        outqueues = set(fileno_to_outq)
        while outqueues and self._state != TERMINATE:  # Celery: while cache and outqueues and ...
            if check_timeouts is not None:
                check_timeouts()
            pending_remove_fd: set[int] = set()
            for fd in outqueues:
                asynpool.iterate_file_descriptors_safely(
                    [fd], self.fileno_to_outq, self._flush_outqueue,
                    pending_remove_fd.add, fileno_to_outq, on_state_change)
                try:
                    join_exited_workers(shutdown=True)
                except WorkersJoined:
                    return
            outqueues.difference_update(pending_remove_fd)

    def _flush_outqueue(
        self, fd: int, remove: Callable[[int], Any], process_index: dict[int, Any],
        on_state_change: Callable[[Any], object],
    ) -> Any:
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


class Worker(QuickExit, asynpool.Worker):
    """A pool child that exits as soon as it has said so (no one-second sleep)."""


class AsynPool(asynpool.AsynPool):
    ResultHandler = ResultHandler
    Worker = Worker


class TaskPool(prefork.TaskPool):
    Pool = AsynPool
    _pool: Any  # Celery's: the AsynPool, None once stopped

    def on_stop(self) -> None:
        """Gracefully stop the pool (warm shutdown)."""
        if self._pool is None or self._pool._state not in (RUN, CLOSE):
            return
        self._pool.close()
        hub: Any = get_event_loop()
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


# -- the worker's state ----------------------------------------------------------


def warm_shutdown() -> None:
    """Start Celery's warm shutdown: the event loop raises WorkerShutdown, the consumer stops,
    the pool drains, exit code 0. Safe in a signal handler (one assignment)."""
    state.should_stop = 0


def running_requests() -> list[Any]:
    """Requests being executed by a pool child (or thread, or greenlet) right now (MainProcess view).

    Read in one step (:func:`stopright.upstream.cpython.weakset_snapshot`):
    iterating the set while another thread adds to it raised, and an answer
    of "nothing" ends the grace.
    """
    return [r for r in weakset_snapshot(state.active_requests) if r.worker_pid]


def after_stop_handlers(worker: Any, then: Callable[[Any], object]) -> None:
    """``then(worker)`` right after Celery installs its stop handlers, in ``on_start`` after the banner.

    From there to ``worker_ready`` (the pool starting, the broker connecting: seconds on a loaded
    machine) Celery's own stop would run: its children die of a group's SIGTERM and its pool drain
    can wait 30 s. No task runs before ``worker_ready``.
    """
    installed = worker.install_platform_tweaks

    def tweaks(w: Any) -> None:
        installed(w)
        then(w)

    worker.install_platform_tweaks = tweaks


def replace_shutdown_command(on_shutdown: Callable[[], object]) -> None:
    """``celery control shutdown``: call ``on_shutdown()``, then Celery's own warm shutdown.

    Celery's command only raises WorkerShutdown: a warm shutdown with no
    deadline, which waits for running tasks however long they take. This
    one, registered under the same name, lets the caller bound it.
    """

    @control_command(name="shutdown")  # type: ignore[untyped-decorator]  # Celery's, untyped
    def shutdown(_state: object, **_: object) -> None:
        """Shutdown worker(s), within the grace (replaces Celery's ``shutdown`` command)."""
        on_shutdown()
        raise WorkerShutdown(EX_OK)


def reset_apps_after_fork() -> None:
    """After ``os.fork`` (gunicorn's): Celery's own reset of each app's pools, as after billiard's forks."""
    apps = set(_state._get_active_apps())  # an app's close() takes it out of this set ...
    current = getattr(_state._tls, "current_app", None)  # ... but not from here
    if current is not None:
        apps.add(current)
    for app in apps:
        app._after_fork()


def beat_without_sync_handler(app: Any) -> None:
    """``celery beat``: no SIGTERM/SIGINT handler of Celery's between its banner and the scheduler's.

    Celery's handler syncs the schedule in signal context: a signal in the
    moment before the scheduler exists builds a second one inside the handler
    (in the middle of the first one's imports: a traceback and exit 1). The
    start-up handlers (stopright.signals.exit_on_stop_signals) stay until the
    scheduler installs its own (stopright/celery_beat.py).
    """
    base = app.Beat

    class Beat(base):  # type: ignore[misc, valid-type]
        def install_sync_handler(self, service: object) -> None:
            return None

    app.Beat = Beat


def result_backend_close(backend: object) -> Callable[[], None] | None:
    """The close of a pool child's result-backend connections; None where there is nothing to close.

    Celery's database backend keeps a pooled engine in a forked pool child
    (``SessionManager.forked``; elsewhere each session's connection closes at
    once) and nothing closes it: a child exits with ``os._exit``, and
    PostgreSQL logs each of them as ``unexpected EOF``. Other backends keep
    theirs in kombu's pools (closed with them) or in clients whose servers do
    not mind.
    """
    invalidate = getattr(getattr(backend, "session_manager", None), "invalidate", None)
    url = getattr(backend, "url", None)
    if invalidate is None or not url:
        return None
    return functools.partial(invalidate, url)
