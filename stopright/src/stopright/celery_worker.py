"""The worker's and beat's side of ``install()`` (stopright/celery_app.py), loaded by their first signal.

What a stop does to a stock Celery worker, and what ``install`` changes:

* honcho, systemd and Heroku send SIGTERM to every process of the tree at
  once. Celery resets SIGTERM in its pool children, so they die with their
  tasks (``WorkerLostError: signal 15``) while the MainProcess is still in
  its warm shutdown. Here pool children ignore SIGTERM, SIGINT and SIGQUIT
  (``worker_process_init``) and answer only the MainProcess's hand-back
  signal (stopright/handback.py).
* Celery's warm shutdown has no time limit, and SIGQUIT or a second Ctrl+C
  make it cold (children killed, tasks lost). Here every stop signal starts
  the bounded stop of stopright/worker_stop.py: quiet, stop within
  ``grace``, hand back; a second SIGINT or SIGQUIT only hands back at once.
  ``celery control shutdown`` gets the same bounded stop.
* Delivery settings that make a hand-back a requeue, not a loss
  (stopright/settings.py), the pool and consumer without their fixed sleeps
  (stopright/upstream/celery.py), and every process's kombu connections
  closed with their protocol's handshake, in the process that opened them.
* The MainProcess follows its manager's death (no orphan worker) and
  writes every thread's stack on SIGURG.
* Every pool stops the same bounded way (stopright/pools.py): the pool Celery
  chose (``-P``, ``worker_pool``) is replaced by stopright's version of it
  at ``worker_init``, and a pool it cannot stop stops the start.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import current_app
from celery.concurrency import get_implementation, prefork

from stopright import budget, checks, pools, registry, settings
from stopright import signals as stop_signals
from stopright.handback import HANDBACK_SIGNAL, QuietHandBack, interrupt
from stopright.upstream import billiard as billiard_internals
from stopright.upstream import celery as celery_internals
from stopright.upstream import celery_consumer
from stopright.upstream import kombu as kombu_internals
from stopright.upstream.support import applies
from stopright.worker_stop import CLOSE_SECONDS, WorkerStop

log = logging.getLogger("stopright")

_installed: dict[str, Any] = {}  # the MainProcess's pid, Pool and WorkerStop once known
#: install()'s options (stopright/celery_app.py sets them before any receiver here runs).
options: dict[str, Any] = {}


def wire() -> None:
    """Worker MainProcess, first thing (``celeryd_init``): the hooks only a worker needs.

    Its pool children inherit them across the fork; a publishing process
    (a web worker) never loads this module (stopright/celery_app.py).
    """
    if _installed.get("wired"):
        return
    _installed["wired"] = True
    logging.getLogger(celery_internals.TRACE_LOGGER).addFilter(QuietHandBack())
    billiard_internals.after_signal_reset.append(_child_signals)
    celery_consumer.connection_lost_hooks.append(_hand_back_on_connection_loss)
    if applies("worker stop") and applies("remote shutdown"):
        celery_internals.replace_shutdown_command(_remote_shutdown)


def worker_starting(**_: object) -> None:
    """MainProcess, first thing: the worker's hooks; follow the manager's death; stack dumps; the
    budget's warnings."""
    wire()
    _installed["main_pid"] = os.getpid()
    if applies("broker connections"):
        kombu_internals.forget_inherited_in_forks()  # the pool's children
    stop_signals.stop_with_parent()
    stop_signals.enable_stack_dumps()
    budget.announce()


def worker_init(sender: Any = None, **_: object) -> None:
    """MainProcess, before the pool is built (and forks): stopright's version of the pool Celery
    chose; its kombu connections closed at exit."""
    _installed["main_pid"] = os.getpid()
    if applies("worker stop"):
        _installed["pool"] = pools.choose(sender)
        celery_internals.after_stop_handlers(sender, _install_stop_handlers)
    if applies("broker connections"):
        registry.register("celery broker connections", kombu_internals.close_pooled_connections, forks=False)


def warn_worker(instance: Any, **_: object) -> None:
    """MainProcess, logging set up, before the pool starts: the tasks' base, what its forks leave behind."""
    checks.warn_tasks_not_handed_back(instance.app)
    pool = get_implementation(instance.pool_cls)
    checks.warn_left_behind_by_pool(isinstance(pool, type) and issubclass(pool, prefork.TaskPool))


def check_beat(sender: Any, **_: object) -> None:
    """Beat, its scheduler built: stopright's, or stop here with what to change."""
    settings.at_start(sender.app)
    if applies("beat"):
        checks.require_stopright_scheduler(sender.scheduler)


def _install_stop_handlers(sender: Any = None, **_: object) -> None:
    """MainProcess: replace Celery's stop handlers as soon as it installs them (before the pool
    starts); at worker_ready if that could not be done. ``sender``: the worker, or its consumer."""
    if not applies("worker stop") or "stop" in _installed:
        return
    pool = _installed.get("pool") or pools.Pool("prefork")
    pool.start(getattr(sender, "pool", None))
    stop = WorkerStop(budget.current().grace, options.get("on_hand_back"), pool,
                      hostname=getattr(sender, "hostname", ""))
    _installed["stop"] = stop
    stop.start_watchdog()
    for signum in stop_signals.STOP_SIGNALS:
        signal.signal(signum, stop.on_signal)
    # The consumer's event loop wakes on these signals at once (upstream/celery_consumer.py).


def worker_ready(sender: Any = None, **_: object) -> None:
    """MainProcess, its loop running: the stop handlers (if Celery's could not be replaced sooner)."""
    _install_stop_handlers(sender)
    if "stop" in _installed:
        _installed["stop"].ready.set()


def _hand_back_on_connection_loss(connection: Any, running: list[Any]) -> None:
    """MainProcess, broker connection lost: hand back the running late-ack tasks.

    RabbitMQ requeues a lost connection's unacknowledged messages at once, and
    kombu's Redis channel restores them when Celery closes it, if Redis still
    answers: a task still running here would run again beside itself, on this
    worker once it has reconnected, or on another. Celery's own answer
    (``worker_cancel_long_running_tasks_on_connection_loss``) SIGTERMs the
    child, which ignores it, and marks the task RETRY in the result backend;
    the hand-back stops the run and stores nothing. Where the broker has the
    message back, the delivery is forgotten (a reject would requeue it a
    second time, or go to the dead channel); a Redis that does not answer
    keeps it as unacknowledged, and the hand-back's refused requeue is done
    once it is back (stopright/requeue.py).
    """
    pool = _installed.get("pool")
    if not running or pool is None:
        return
    amqp = getattr(getattr(connection, "transport", None), "driver_type", "") == "amqp"
    given_back = amqp or kombu_internals.answers(connection)
    log.warning("broker connection lost: handing back %d running task(s)%s", len(running),
                "; the broker gives them out again" if given_back else "; the broker does not answer")
    for request in running:
        if given_back:
            celery_consumer.forget_delivery(request)
        pool.hand_back(request)


def _remote_shutdown() -> None:
    stop = _installed.get("stop")
    if stop is not None:
        stop.on_remote_shutdown()


def child_init(**_: object) -> None:
    """Pool child, right after fork: its own connections, and signals a group broadcast cannot use.

    SIGTERM, SIGINT (a terminal's Ctrl+C) and SIGQUIT (supervisord's
    ``stopasgroup``) reach every process of the group; they are for the
    MainProcess, which decides when this child's task must hand back. An
    orphaned child (its MainProcess gone) takes them as a stop. Celery's
    solo pool sends this signal in the MainProcess itself: nothing to do there.
    """
    main = _installed.get("main_pid")
    if main is None or os.getpid() == main:
        return
    if os.getppid() != main:  # the MainProcess died before Celery set our parent-death signal
        os._exit(1)
    stop_signals.enable_stack_dumps()
    if applies("broker connections"):
        registry.register("celery broker connections", kombu_internals.close_pooled_connections)
    close_backend = celery_internals.result_backend_close(current_app.backend)  # this thread's: the tasks'
    if close_backend is not None:
        registry.register("celery result backend", close_backend)
    if not applies("worker stop"):  # Celery's own stop: its children keep its signals
        return
    for signum in stop_signals.STOP_SIGNALS:  # billiard keeps SIG_IGN; _child_signals replaces it
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(HANDBACK_SIGNAL, interrupt)


def _child_signals() -> None:
    """Pool child, once billiard has set its own handlers: the stop signals (:func:`_child_stop_signal`)."""
    if _installed.get("main_pid") not in (None, os.getpid()):
        for signum in stop_signals.STOP_SIGNALS:
            signal.signal(signum, _child_stop_signal)


def _child_stop_signal(signum: int, _frame: object) -> None:
    """Pool child's SIGTERM/SIGINT/SIGQUIT: ignored while its MainProcess lives (the group's
    broadcast); an orphan stops on it, as any process does.

    Celery gives each child the kernel's SIGKILL when its MainProcess dies
    (``PR_SET_PDEATHSIG``); a child that lost it (a library reset it, or the
    MainProcess died before it was set) must still be stoppable with ``kill``.
    Signal context: one ``getppid``, then the default action.
    """
    if os.getppid() == _installed.get("main_pid"):
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def child_shutdown(**_: object) -> None:
    """Pool child, leaving (billiard exits it with ``os._exit``: atexit never runs here)."""
    if os.getpid() != _installed.get("main_pid"):
        registry.current().close_all()


def worker_shutdown(sender: Any = None, **_: object) -> None:
    """MainProcess, after the consumer's connection is closed (warm paths): the registry, then
    the stop's watchdog ends the process (:meth:`WorkerStop.park`)."""
    registry.current().close_all(budget=CLOSE_SECONDS)
    stop = _installed.get("stop")
    if stop is not None:
        stop.exit_code = getattr(sender, "exitcode", 0) or 0
        stop.closed.set()
        if stop.started:
            stop.park()
