"""The worker MainProcess's stop: quiet, stop within the grace, hand back. Bounded phase by phase.

The hazard: Celery's warm shutdown has no deadline of its own anywhere. It
waits for running tasks however long they take, then for the pool's
children to exit, then for the broker to confirm the consumer's close; and a
manager's SIGKILL (honcho: 5 s) ends it wherever it is, the tasks then
running lost or marked failed. :class:`WorkerStop` bounds it, in the
phases Sidekiq names:

1. **quiet**: the first stop signal starts Celery's warm shutdown (the
   consumer stops fetching); running tasks go on;
2. **stop**: running tasks finish within the grace (a second SIGINT or
   SIGQUIT ends it at once);
3. **hand back**: each task still running hands back (stopright/handback.py:
   the message is requeued), the way its pool allows (stopright/pools.py:
   SIGUSR2 to a prefork child, an exception raised in a thread or thrown
   into a greenlet), within :data:`HANDBACK_SECONDS`; or its pool gives up
   on it (a prefork child is SIGKILLed, ``task_reject_on_worker_lost``
   requeues its message; ``on_hand_back`` is told); then the children exit,
   the consumer and connections close, and the ``atexit`` handlers run,
   each phase with its deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
from celery import signals as celery_signals

from stopright import handback, registry, signals
from stopright.budget import WORKER_AFTER_GRACE
from stopright.pools import Pool
from stopright.upstream import celery as celery_internals
from stopright.upstream.cpython import run_atexit_handlers

log = logging.getLogger("stopright")

#: After SIGUSR2, how long a pool child has to hand its job back before SIGKILL.
HANDBACK_SECONDS = 0.5
#: How long the user's ``on_hand_back`` may take at the close, for every killed child's task together.
ON_HAND_BACK_SECONDS = 0.5
#: How long the app's ``worker_shutting_down`` receivers may take, out of the grace.
RECEIVERS_SECONDS = 0.5
#: Once no task runs, how long the pool's children have to exit.
POOL_EXIT_SECONDS = 0.5
#: Then how long the MainProcess has to close the consumer and its connections: at least this, or
#: what is left of the stop budget (grace + :data:`stopright.budget.WORKER_AFTER_GRACE`) but
#: :data:`EXIT_SECONDS`.
CLOSE_SECONDS = 1.0
#: Then the ``atexit`` handlers (an error reporter's or a tracer's flush) get what is left of the
#: stop budget (grace + :data:`stopright.budget.WORKER_AFTER_GRACE` from the signal), at least this.
EXIT_SECONDS = 0.25
#: When the MainProcess must exit at once: what its registry may still take.
EXIT_CLOSE_SECONDS = 0.3
#: Under gevent and eventlet, past the budget by this much, an OS thread exits the worker anyway
#: (a task that never yields holds up the hub, and the watchdog with it).
LAST_RESORT_SECONDS = 0.5


class WorkerStop:
    """The MainProcess's stop: warm, then bounded phase by phase.

    Celery's warm shutdown has no deadline of its own anywhere: it waits for
    running tasks, then for the pool's children to exit (a child can wait up
    to 30 s in billiard's ``_ensure_messages_consumed`` for the parent to
    count its last result: measured under load, the MainProcess then sat in
    ``Pool.join`` until honcho's SIGKILL, with no task running), then for the
    broker to confirm the consumer's close. Here one watchdog thread follows
    the phases, each with its deadline, all derived from the grace budget:

    1. running tasks finish, within ``SHUTDOWN_GRACE_SECONDS`` (a second
       SIGINT or SIGQUIT ends it at once); then each task still running hands
       back, within :data:`HANDBACK_SECONDS`, or its pool gives up on it;
    2. the pool's children (prefork) exit, within :data:`POOL_EXIT_SECONDS`
       of no task running;
    3. Celery closes the consumer, ``worker_shutdown`` runs the registry,
       within what is left of the budget (at least :data:`CLOSE_SECONDS`);
    4. the ``atexit`` handlers run, in what is left of the budget (at least
       :data:`EXIT_SECONDS`), and the watchdog ends the process.

    A phase that overruns is logged with the stack of every thread (children:
    their own dump, :data:`stopright.signals.STACK_DUMP_SIGNAL`) and cut short:
    the children are killed once their work is done or handed back; a
    MainProcess that cannot finish closing is made to exit (code 1); handlers
    still running at the deadline are left. So the whole stop ends within
    grace + 2 s (inside honcho's 5 s at the default grace of 3 s), whatever
    hangs.
    """

    def __init__(self, grace: float, on_hand_back: Callable[[Any], object] | None = None,
                 pool: Pool | None = None, hostname: str = "") -> None:
        self.grace = grace
        self.hostname = hostname
        self.on_hand_back = on_hand_back
        self.pool = pool or Pool("prefork")
        self._started = False
        self._begun_at = 0.0
        self._again: int | None = None  # a later SIGINT/SIGQUIT: hand back now
        self._wakeup = signals.Wakeup()  # the handler wakes the watchdog through it
        self.closed = threading.Event()  # set by worker_shutdown once the registry has run
        self.ready = threading.Event()  # set by worker_ready: Celery's main thread runs its loop
        self.exit_code = 0  # Celery's, as worker_shutdown found it

    @property
    def started(self) -> bool:
        return self._started

    @property
    def deadline(self) -> float:
        """When the whole stop must be over (monotonic): grace + what the phases after it take."""
        return self._begun_at + self.grace + WORKER_AFTER_GRACE

    def start_watchdog(self) -> None:
        """Start the watchdog thread, idle until the stop begins (not from a signal handler:
        starting a thread takes locks)."""
        threading.Thread(target=self._watch, name="stop-watchdog", daemon=True).start()

    def on_signal(self, signum: int, _frame: object) -> None:
        """MainProcess's handler: the first stop signal starts the warm shutdown; a later
        SIGINT/SIGQUIT hands back now.

        Signal context: it only records (assignments and one ``write(2)``), no
        lock, no logging; the watchdog thread logs. A repeated SIGTERM changes
        nothing: the kernel's parent-death signal (``stop_with_parent``) comes
        once per thread of the dying parent, so two can arrive within a
        millisecond of each other.
        """
        if self._started:
            if signum != signal.SIGTERM and self._again is None:
                self._again = signum
                self._wakeup.set()
            return
        registry.current().record_signal(signum)
        self.begin()

    def on_remote_shutdown(self) -> None:
        """``celery control shutdown``: the same bounded stop as a signal.

        Celery's own command only raises WorkerShutdown: a warm shutdown with
        no deadline, which waits for running tasks however long they take.
        """
        if not self._started:
            log.warning("shutdown requested by a remote control command")
            self.begin()

    def begin(self) -> None:
        """Phase 1, quiet: Celery's warm shutdown (no more fetching); wake the watchdog that bounds it.

        Safe in a signal handler: two assignments and one ``write(2)``.
        """
        if self._started:
            return
        self._started = True
        self._begun_at = time.monotonic()
        celery_internals.warm_shutdown()  # quiet: the consumer stops fetching
        self._wakeup.set()

    def _plan(self) -> str:
        return f"grace {self.grace:.1f} s for {len(_running())} running task(s)"

    def _watch(self) -> None:
        while not self._started:
            self._wakeup.wait()
        try:
            # Quiet began in the handler (begin): the consumer fetches nothing more. The log
            # lines the handler could not write: "signal received", "graceful shutdown started".
            registry.current().begin(self._plan())
            self._tell_receivers()
            self.pool.last_resort(self.deadline + LAST_RESORT_SECONDS - time.monotonic(),
                                  "the worker's event hub is held up (a task that does not yield?)")
            running = self._stop_within_grace()
            if running and self._hand_back(running):
                _exit_now(1, self.deadline)
            # Stopped while starting (no task runs before worker_ready): Celery's main thread gets
            # to its loop, and from there stops the pool it started, before the children can exit.
            self.ready.wait(max(0.0, self.deadline - CLOSE_SECONDS - POOL_EXIT_SECONDS - time.monotonic()))
            if self.pool.has_children and not _wait_until(_pool_children_gone, POOL_EXIT_SECONDS):
                _overran(f"the pool's children did not exit within {POOL_EXIT_SECONDS} s of their last task")
                _kill_pool_children()
            # At least CLOSE_SECONDS, else what the earlier phases left (kombu's Redis consumer waits
            # for its pending BRPOP, a second by default, and a loaded machine adds to it).
            close_by = max(time.monotonic() + CLOSE_SECONDS, self.deadline - EXIT_SECONDS)
            if not self.closed.wait(close_by - time.monotonic()):
                _overran(f"closing the consumer and connections was not done {self._since():.1f} s "
                         f"into the stop")
                _exit_now(1, self.deadline)
            # Everything is closed; Celery's main thread waits in worker_shutdown (:meth:`park`).
            _exit_now(self.exit_code, self.deadline)
        except BaseException:  # noqa: BLE001 - this thread must never die silently
            log.exception("stop watchdog failed; exiting now")
            _exit_now(1, self.deadline)

    def _tell_receivers(self) -> None:
        """Celery's ``worker_shutting_down``, as its own stop handler sends it (a stop signal only).

        From this thread, not the handler: receivers may log. Each gets
        :data:`RECEIVERS_SECONDS` in all; one that blocks is left behind.
        """
        signum = registry.current().recorded_signal
        if signum is None:  # the remote shutdown command: Celery sends nothing either
            return
        told = threading.Thread(target=celery_signals.worker_shutting_down.send, name="worker_shutting_down",
                                kwargs={"sender": self.hostname, "sig": signal.Signals(signum).name,
                                        "how": "Warm", "exitcode": 0}, daemon=True)
        told.start()
        told.join(RECEIVERS_SECONDS)
        if told.is_alive():
            _overran(f"worker_shutting_down receivers still running after {RECEIVERS_SECONDS} s")

    def _since(self) -> float:
        return time.monotonic() - self._begun_at

    def park(self) -> None:
        """Celery's main thread, after ``worker_shutdown``: wait here while the watchdog ends the process.

        The watchdog runs the ``atexit`` handlers within what is left of the
        budget and exits. The interpreter's own exit would first join every
        non-daemon thread, with no time limit: a threads-pool task thread
        blocked in a C call would hold it, and the handlers after it, for ever.
        """
        threading.Event().wait()

    def _stop_within_grace(self) -> list[Any]:
        """Phase 2, stop: running tasks finish within the grace (a second SIGINT/SIGQUIT ends it).

        Returns the requests still running when it ends.
        """
        deadline = time.monotonic() + self.grace
        while _running() and time.monotonic() < deadline and self._again is None:
            self._wakeup.wait(min(_POLL, max(0.0, deadline - time.monotonic())))
        if self._again is not None:
            log.warning("%s again: handing back running tasks now", signal.Signals(self._again).name)
        return _running()

    def _hand_back(self, running: list[Any]) -> bool:
        """Phase 3, hand back: each running task hands back (requeued), or the pool gives up on it.

        How depends on the pool (stopright/pools.py): never a signal to this
        process itself, where the task runs elsewhere. True when the process
        must exit now (solo: its main thread is stuck in the task).
        """
        log.warning("grace of %.1f s used up: handing back %d running task(s)", self.grace, len(running))
        for request in running:
            self.pool.hand_back(request)
        _wait_until(lambda: not _still_running(running), HANDBACK_SECONDS)
        late = _still_running(running)
        for request in late:
            self.pool.give_up(request, HANDBACK_SECONDS)
        self._handed_back_for(late)  # with the close handlers (outages: bounded, after the kill)
        return bool(late) and self.pool.kind == "solo"

    def _handed_back_for(self, requests: list[Any]) -> None:
        """The user's ``on_hand_back(request)`` for each task whose child was killed: after the kill, bounded.

        Its message is requeued anyway (``task_reject_on_worker_lost``); this
        is for what the task kept elsewhere (the demo: its ledger row). It runs
        with this process's close handlers (newest first: before a database it
        uses is closed), within :data:`ON_HAND_BACK_SECONDS` and the close
        phase's budget, its stack logged if it overruns: the demo's writes to a
        frozen database ran before the kill, with no limit, and held the stop
        past honcho's SIGKILL.
        """
        on_hand_back = self.on_hand_back
        if on_hand_back is None or not requests:
            return

        def call_each() -> None:
            for request in requests:
                try:
                    on_hand_back(request)
                except Exception:  # noqa: BLE001 - the others still get theirs
                    log.exception("on_hand_back failed for task %s[%s]", request.name, request.id)

        registry.current().register(f"on_hand_back for {len(requests)} killed task(s)", call_each,
                                    timeout=ON_HAND_BACK_SECONDS)


_POLL = 0.01


def _wait_until(done: Callable[[], object], seconds: float) -> bool:
    """Poll ``done()`` until it is true (True) or ``seconds`` have passed (False)."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _overran(what: str) -> None:
    log.error("stop phase overran: %s; stacks of every thread follow", what)
    signals.log_stacks("stop phase overran")


def _pool_children() -> list[psutil.Process]:
    """This MainProcess's pool children still running (zombies count as gone)."""
    alive = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            continue
    return alive


def _pool_children_gone() -> bool:
    return not _pool_children()


def _kill_pool_children() -> None:
    """Kill children whose work is done or handed back: first their own stack dump, then SIGKILL."""
    children = _pool_children()
    for child in children:
        log.error("pool child %s still running: its stacks follow, then SIGKILL", child.pid)
        _kill(child.pid, signals.STACK_DUMP_SIGNAL)
    time.sleep(0.05)  # the dump is written by the child's own signal handler
    for child in children:
        _kill(child.pid, signal.SIGKILL)


def _exit_now(code: int, deadline: float) -> None:
    """Close what is left, then end the process as the interpreter would, within ``deadline``.

    The interpreter's exit first joins every non-daemon thread, then runs the
    ``atexit`` handlers (an error reporter's or a tracer's flush), neither
    with a time limit. Here both get what is left of the stop budget (the
    handlers at least :data:`EXIT_SECONDS`), each overrun is logged with the
    stacks, and the process leaves. A task thread the stop gave up on
    (threads pool) is not waited for.
    """
    registry.current().close_all(budget=EXIT_CLOSE_SECONDS)
    overran = False
    stuck = _join_threads(deadline)
    if stuck:
        overran = True
        _overran(f"the process did not exit after closing its connections: non-daemon thread(s) "
                 f"{', '.join(stuck)} still running")
    runner = threading.Thread(target=run_atexit_handlers, name="atexit", daemon=True)
    started = time.monotonic()
    runner.start()
    runner.join(max(EXIT_SECONDS, deadline - started))
    if runner.is_alive():
        overran = True
        _overran(f"the atexit handlers were still running after {time.monotonic() - started:.1f} s, "
                 f"the rest of the stop budget")
    if code or overran:
        log.error("worker exits now (exit code %d)", code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - leaving anyway
            pass
    os._exit(code)


def _join_threads(deadline: float) -> list[str]:
    """Wait until ``deadline`` for the non-daemon threads (not the main one, nor an abandoned task's);
    the names of those still running."""
    main = threading.main_thread()
    skip = {main.ident, threading.get_ident(), *handback.abandoned_threads()}
    # eventlet lists the main thread twice, as its own and as the interpreter's (another ident)
    waiting = [t for t in threading.enumerate()
               if not t.daemon and t.ident not in skip and t.name != main.name]
    for thread in waiting:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in waiting if t.is_alive()]


_running = celery_internals.running_requests


def _still_running(requests: list[Any]) -> list[Any]:
    active = {id(r) for r in _running()}
    return [r for r in requests if id(r) in active]


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
