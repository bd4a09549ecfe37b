"""How a Celery worker starts and stops: the whole story, in one place.

The hazard: honcho, systemd and Heroku send SIGTERM to every process of the
tree at once. Celery resets SIGTERM in its pool children, so they die with
their tasks (``WorkerLostError: signal 15``) while the MainProcess is still
in its warm shutdown; and that warm shutdown has no time limit of its own.

What we do instead:

* Pool children ignore SIGTERM, SIGINT and SIGQUIT (``worker_process_init``): a
  broadcast cannot kill a running task. They answer SIGUSR2 by handing their
  job back (tasks/jobs.py: ``HandBack`` -> ledger ``queued`` -> ``Reject``
  with requeue).
* The MainProcess answers the first SIGTERM/SIGINT/SIGQUIT with Celery's
  *warm* shutdown (stop consuming, let running tasks finish) and starts a
  watchdog. When ``SHUTDOWN_GRACE_SECONDS`` is used up, the watchdog sends
  SIGUSR2 to every child still running a task; a child that does not hand
  back within ``HANDBACK_SECONDS`` is SIGKILLed (``task_reject_on_worker_lost``
  requeues its message, the watchdog requeues its ledger row). A second
  SIGINT or SIGQUIT skips the rest of the grace. Celery's cold shutdown is never used:
  it would SIGTERM the children, which now ignore it, and wait forever.
* Connections never cross a fork: each child drops the inherited database
  pool and opens its own; every process closes what it opened through its
  shutdown registry (``worker_process_shutdown`` in children,
  ``worker_shutdown`` in the MainProcess, after Celery closed the consumer).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import psutil
from celery import signals
from celery.exceptions import WorkerShutdown
from celery.platforms import EX_OK
from celery.worker import state
from celery.worker.control import control_command

from app import budget, shutdown
from core import broker, db, forks, logs
from jobs import ledger
from tasks import jobs

log = logging.getLogger("shutdown")

#: After SIGUSR2, how long a pool child has to hand its job back before SIGKILL.
HANDBACK_SECONDS = 0.5
#: Once no task runs, how long the pool's children have to exit.
POOL_EXIT_SECONDS = 0.5
#: Then how long the MainProcess has to close the consumer and its connections, and exit.
CLOSE_SECONDS = 1.0
#: Of which the interpreter's own exit, once everything is closed, has at least this.
EXIT_SECONDS = 0.25
#: When the MainProcess must exit at once: what its registry may still take.
EXIT_CLOSE_SECONDS = 0.3

_stop: WorkerStop | None = None  # the MainProcess's, once the worker is ready


@signals.celeryd_init.connect
def _worker_starting(**_: object) -> None:
    """MainProcess, first thing: follow honcho's death; wait for the broker.

    The embedded broker starts beside us: waiting for it here skips Celery's
    2 s connection-retry sleeps.
    """
    shutdown.stop_with_parent()
    shutdown.enable_stack_dumps()
    budget.announce()
    broker.wait_until_up()


@signals.worker_init.connect
def _worker_init(**_: object) -> None:
    """MainProcess, before the pool forks: schema, and what to close at exit."""
    ledger.ensure_schema()
    shutdown.current().register("celery broker connections", broker.close_celery_connections)
    forks.share_with_forks()


@signals.worker_ready.connect
def _install_stop_handlers(sender: object, **_: object) -> None:
    """MainProcess: replace Celery's stop handlers (installed just before)."""
    global _stop
    _stop = WorkerStop(budget.current().grace)
    _stop.start_watchdog()
    for signum in shutdown.STOP_SIGNALS:
        signal.signal(signum, _stop.on_signal)
    # The event loop wakes on these signals at once: tasks/consumer.py.


@control_command(name="shutdown")
def _remote_shutdown(_state: object, **_: object) -> None:
    """Shutdown worker(s), within the grace (replaces Celery's ``shutdown`` command)."""
    if _stop is not None:
        _stop.on_remote_shutdown()
    raise WorkerShutdown(EX_OK)


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
       SIGINT or SIGQUIT ends it at once); then each child still busy hands
       its job back (SIGUSR2), within :data:`HANDBACK_SECONDS`, or is killed;
    2. the pool's children exit, within :data:`POOL_EXIT_SECONDS` of no task
       running;
    3. Celery closes the consumer, ``worker_shutdown`` runs the registry and
       the process exits, within :data:`CLOSE_SECONDS`.

    A phase that overruns is logged with the stack of every thread (children:
    their own dump, :data:`app.shutdown.STACK_DUMP_SIGNAL`) and cut short:
    the children are killed once their work is done or handed back; a
    MainProcess that cannot finish closing is made to exit (code 1; 0 if
    everything was closed and only the interpreter's exit hung). So the
    whole stop ends within grace + 2 s (inside honcho's 5 s at the default
    grace of 3 s), whatever hangs.
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._started = False
        self._again: int | None = None  # a later SIGINT/SIGQUIT: hand back now
        self._wakeup = shutdown.Wakeup()  # the handler wakes the watchdog through it
        self.closed = threading.Event()  # set by worker_shutdown once the registry has run

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
        shutdown.current().record_signal(signum)
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
        """Start Celery's warm shutdown and wake the watchdog that bounds it (once).

        Safe in a signal handler: two assignments and one ``write(2)``.
        """
        if self._started:
            return
        self._started = True
        # Celery's own warm shutdown: the event loop raises WorkerShutdown,
        # the consumer stops, the pool drains, exit code 0.
        state.should_stop = 0
        self._wakeup.set()

    def _plan(self) -> str:
        return f"grace {self.grace:.1f} s for {len(_running())} running task(s)"

    def _watch(self) -> None:
        while not self._started:
            self._wakeup.wait()
        try:
            # The log lines the handler could not write: "signal received", "graceful shutdown started".
            shutdown.current().begin(self._plan())
            self._finish_or_hand_back()
            if not _wait_until(_pool_children_gone, POOL_EXIT_SECONDS):
                _overran(f"the pool's children did not exit within {POOL_EXIT_SECONDS} s of their last task")
                _kill_pool_children()
            deadline = time.monotonic() + CLOSE_SECONDS
            if not self.closed.wait(CLOSE_SECONDS):
                _overran(f"closing the consumer and connections took more than {CLOSE_SECONDS} s")
                _exit_now(1)
            # Everything is closed; Celery returns and the interpreter exits, taking this thread.
            time.sleep(max(EXIT_SECONDS, deadline - time.monotonic()))
            _overran("the process did not exit after closing its connections")
            _exit_now(0)
        except BaseException:  # noqa: BLE001 - this thread must never die silently
            log.exception("stop watchdog failed; exiting now")
            _exit_now(1)

    def _finish_or_hand_back(self) -> None:
        deadline = time.monotonic() + self.grace
        while _running() and time.monotonic() < deadline and self._again is None:
            self._wakeup.wait(min(_POLL, max(0.0, deadline - time.monotonic())))
        if self._again is not None:
            log.warning("%s again: handing back running tasks now", signal.Signals(self._again).name)
        running = _running()
        if not running:
            return
        log.warning("grace of %.1f s used up: handing back %d running task(s)", self.grace, len(running))
        for request in running:
            _kill(request.worker_pid, signal.SIGUSR2)
        _wait_until(lambda: not _still_running(running), HANDBACK_SECONDS)
        for request in _still_running(running):
            job_id = request.args[0] if request.args else "?"
            log.error("pool child %s did not hand back job %s within %.1f s: SIGKILL",
                      request.worker_pid, job_id, HANDBACK_SECONDS)
            _hand_back_for(job_id)
            _kill(request.worker_pid, signal.SIGKILL)


_POLL = 0.01


def _wait_until(done, seconds: float) -> bool:
    """Poll ``done()`` until it is true (True) or ``seconds`` have passed (False)."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _overran(what: str) -> None:
    log.error("stop phase overran: %s; stacks of every thread follow", what)
    shutdown.log_stacks("stop phase overran")


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
        _kill(child.pid, shutdown.STACK_DUMP_SIGNAL)
    time.sleep(0.05)  # the dump is written by the child's own signal handler
    for child in children:
        _kill(child.pid, signal.SIGKILL)


def _exit_now(code: int) -> None:
    """Close what is left within the remaining budget, then leave without waiting for anything."""
    shutdown.current().close_all(budget=EXIT_CLOSE_SECONDS)
    log.error("worker exits now (exit code %d)", code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - leaving anyway
            pass
    os._exit(code)


def _hand_back_for(job_id: str) -> None:
    """Queue the ledger row of a job whose child is about to be killed (best effort)."""
    try:
        job = ledger.get(job_id)
        if job is not None and ledger.hand_back(job_id, job["attempts"]):
            log.warning("job %s handed back to the queue for its killed pool child", job_id)
    except Exception:  # noqa: BLE001 - the sweeper requeues it after its lease
        log.exception("could not hand back job %s; the sweeper will requeue it", job_id)


def _running() -> list:
    """Requests being executed by a pool child right now (MainProcess view)."""
    for _ in range(10):  # the event loop may change the set while we copy it
        try:
            return [r for r in list(state.active_requests) if r.worker_pid]
        except RuntimeError:
            time.sleep(0.001)
    return []


def _still_running(requests: list) -> list:
    active = {id(r) for r in _running()}
    return [r for r in requests if id(r) in active]


def _kill(pid: int | None, signum: int) -> None:
    if pid:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


@signals.worker_process_init.connect
def _child_init(**_: object) -> None:
    """Pool child, right after fork: own connections, broadcast-proof signals."""
    logs.set_role("worker.child")
    shutdown.enable_stack_dumps()
    db.after_fork()
    shutdown.current().register("celery broker connections", broker.close_celery_connections)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group broadcast is for the MainProcess
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl+C, likewise
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)  # supervisord's stopasgroup, likewise
    signal.signal(signal.SIGUSR2, lambda *_: jobs.interrupt_running_job())


@signals.worker_process_shutdown.connect
def _child_shutdown(**_: object) -> None:
    """Pool child, leaving (atexit never runs here: children exit by os._exit)."""
    shutdown.current().close_all()
    _skip_exit_sleep()


def _skip_exit_sleep() -> None:
    """Cut billiard's one-second sleep before a pool child exits.

    After this signal, billiard's ``Worker._do_exit`` reports DEATH to the
    parent through a pipe, with SIGTERM blocked, then sleeps 1 s before
    ``os._exit``: a whole second added to every stop. A SIGALRM handler
    polls every 10 ms and exits only once the report is written (we are back
    in ``_do_exit`` with its ``mask`` saved and SIGTERM unblocked again).
    If billiard changes shape, the check never matches and its own
    ``os._exit`` ends the child a second later, as before.
    """

    def on_alarm(_signum: int, frame: object) -> None:
        reported = (
            getattr(getattr(frame, "f_code", None), "co_name", "") == "_do_exit"
            and "mask" in frame.f_locals  # type: ignore[union-attr]
            and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
        )
        if reported:
            os._exit(frame.f_locals.get("exitcode") or 0)  # type: ignore[union-attr]
        signal.setitimer(signal.ITIMER_REAL, 0.01)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.01)


@signals.worker_shutdown.connect
def _worker_shutdown(**_: object) -> None:
    """MainProcess, after the consumer's connection is closed (warm paths)."""
    shutdown.current().close_all(budget=CLOSE_SECONDS)
    if _stop is not None:
        _stop.closed.set()
