"""gunicorn's side: the settings and hook functions a ``gunicorn.conf.py`` takes from here.

    from stopright.gunicorn_hooks import *  # noqa: F403  (or call each hook from yours)

Stop signals and what they do then (every one is graceful):
  SIGTERM (honcho, systemd, Heroku, Kubernetes; under honcho to the master
      *and* workers at once), SIGINT (Ctrl+C of ``gunicorn`` run directly)
      and SIGQUIT (supervisord's and ``honcho export``'s default): workers
      finish the requests in flight, then ``worker_exit`` closes their
      connections; the master waits ``graceful_timeout`` at most. Stock
      gunicorn takes SIGINT and SIGQUIT as its quick stop: requests in
      flight get HTTP 500 or a cut answer.
  With ``SHUTDOWN_DRAIN_SECONDS`` > 0, the first stop signal starts a drain
      first: the master and every worker serve on while
      ``stopright.shutdown_registry().shutting_down`` is set (readiness
      should answer 503 then), so a load balancer stops routing here before
      the listener closes. The master tells its workers (SIGTERM) in case
      only it got the signal (PID 1 of a container); a second SIGINT or
      SIGQUIT ends the drain. A thread times it: no other signal is taken
      (an app's own SIGALRM handler, a request timeout, stays its own).

Every bind: TCP over IPv4 or IPv6, a Unix socket (``unix:/run/web.sock``
behind nginx), a socket inherited from the master before a ``USR2``
upgrade (which outlives it) or from systemd's socket activation. A client
is answered or refused, never reset; nothing refuses connections on a
socket another server still holds, and a socket filter a past server left
on an inherited socket is detached at start (stopright/listener.py).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from stopright import budget, registry
from stopright import signals as stop_signals
from stopright.listener import detach_filter
from stopright.upstream.cpython import run_atexit_handlers
from stopright.upstream.gunicorn import end_drain_after, graceful_master, inherited_listeners, upgraded_from
from stopright.upstream.support import applies

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

__all__ = ["on_exit", "on_starting", "post_fork", "post_worker_init", "worker_class",
           "worker_exit"]

log = logging.getLogger("stopright")

#: gthread (a long poll holds a thread, not a process) and sync, each with the stop of upstream/gunicorn.py.
THREAD_WORKER = "stopright.upstream.gunicorn.ThreadWorker"
SYNC_WORKER = "stopright.upstream.gunicorn.SyncWorker"
worker_class = THREAD_WORKER
#: For the registry at exit: every connection closed, or given up, within it.
CLOSE_BUDGET = 1.0
#: A worker leaves right after closing its connections (and running atexit handlers), without
#: the interpreter's teardown (0.15 to 0.5 s). False: the full teardown.
fast_exit = True


def on_starting(server: Arbiter) -> None:
    """Master: follow the manager's death, stack dumps, inherited sockets made whole, every stop
    signal graceful, after the drain."""
    log_to_error_log(server)
    master = applies("gunicorn master")  # else gunicorn's own master stop (upstream/support.py)
    _stock_worker_class_unless_checked(server)
    # A master started by the USR2 upgrade outlives the one that started it: follow that one's manager.
    stop_signals.stop_with_parent(after=(upgraded_from(server) if master else 0) or None)
    stop_signals.enable_stack_dumps()
    inherited, from_outside = inherited_listeners(server) if master else ([], False)
    for fd in inherited:  # a stopped server of an older stopright may have left its filter there
        if detach_filter(fd):
            log.warning("the listening socket inherited as fd %d dropped new connections (a socket filter "
                        "a past server left on it): detached", fd)
    stop_budget = budget.announce()
    apply_graceful_timeout(server, stop_budget.grace)
    # A preloaded app's publisher connections, decided here once for every worker (they fork from
    # here). Without kombu loaded the master has none, and asking would load Celery into every fork.
    if "kombu" in sys.modules and applies("broker connections"):
        _kombu_internals().forget_inherited_in_forks()
    reg = registry.current()
    registry.warn_left_behind("gunicorn master, before it forks its workers (the app is preloaded)")
    drain = stop_budget.drain
    drain_timer = None

    def on_stop(signum: int) -> bool:  # from the master's loop, not in signal context
        nonlocal drain_timer
        if not reg.shutting_down.is_set():
            reg.signal_received(signum)
            if drain > 0:
                log.info("draining for %.1f s: serving on, /readyz says 503", drain)
                server.kill_workers(signal.SIGTERM)  # they drain too (PID 1 gets the only signal)
                drain_timer = end_drain_after(server, drain)  # then the graceful stop
                return False
        elif signum == signal.SIGTERM and drain_timer is not None and drain_timer.is_alive():
            return False  # a repeat during the drain; SIGINT or SIGQUIT end it
        return True

    if master:
        graceful_master(server, on_stop, from_outside=from_outside)


def _stock_worker_class_unless_checked(server: Arbiter) -> None:
    """Master: stopright's worker class only where its shapes fit this gunicorn; else gunicorn's own."""
    global fast_exit
    from stopright.upstream import gunicorn as ours  # noqa: PLC0415 - the worker classes, imported by now

    kinds: dict[type, str] = {ours.ThreadWorker: "gthread", ours.SyncWorker: "sync"}
    stock = kinds.get(server.worker_class)
    if stock and not applies("gunicorn workers"):
        server.worker_class = _gunicorn_worker(stock)
        fast_exit = False  # relies on worker_exit inside gunicorn's SystemExit, a checked reach too


def _gunicorn_worker(name: str) -> type:
    """gunicorn's own class of the kind ours extends."""
    from gunicorn.workers import gthread, sync  # noqa: PLC0415

    return gthread.ThreadWorker if name == "gthread" else sync.SyncWorker


def apply_graceful_timeout(server: Arbiter, grace: float) -> None:
    """Master, at start: wait for the workers as long as the Celery worker's grace, unless yours is set.

    gunicorn cannot tell a value set to its default (30 s) from an unset
    one: 30 counts as unset, and is replaced.
    """
    setting = server.cfg.settings["graceful_timeout"]
    ours = math.ceil(grace)
    if setting.value == setting.default:
        server.cfg.set("graceful_timeout", ours)
        log.info("graceful_timeout set to %d s (the grace; gunicorn's default %s s)", ours, setting.default)
    elif setting.value < grace:
        log.warning("graceful_timeout=%s kept (yours): shorter than the grace of %.1f s, a request still "
                    "running then is cut", setting.value, grace)
    else:
        log.info("graceful_timeout=%s kept (yours)", setting.value)


class _ErrorLogHandler(logging.Handler):
    """stopright's lines to gunicorn's error log, while the app has no root handler of its own."""

    def __init__(self, error_log: logging.Logger) -> None:
        super().__init__()
        self.error_log = error_log

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:  # else the record propagates to the app's handlers
            self.error_log.handle(record)


def log_to_error_log(server: Arbiter) -> None:
    """Master, at start: where the app configures no logging, the stop's lines go to gunicorn's log.

    Python's last-resort handler prints warnings only, so a stock app would
    show none of its processes' stop sequence (``signal received`` ...
    ``shutdown complete``). Workers inherit the handler; it steps aside for
    an app that sets up root logging later (at import, in a worker).
    """
    stopright_log = logging.getLogger("stopright")
    if logging.getLogger().handlers or stopright_log.handlers:
        return
    stopright_log.addHandler(_ErrorLogHandler(server.log.error_log))  # type: ignore[union-attr]  # set up
    if stopright_log.getEffectiveLevel() > logging.INFO:
        stopright_log.setLevel(logging.INFO)


def post_fork(server: Arbiter, worker: Worker) -> None:
    """Worker, just forked: stack dumps again (signals reset), and the drain it serves."""
    stop_signals.enable_stack_dumps()
    worker.drain_seconds = budget.current().drain  # type: ignore[attr-defined]  # read by ours only


def post_worker_init(worker: Worker) -> None:
    """Worker, app loaded: stop signals recorded (a thread logs them); kombu's pools closed at exit.

    The worker class (upstream/gunicorn.py) makes SIGINT and SIGQUIT as graceful as SIGTERM.
    """
    reg = registry.current()
    if "kombu" in sys.modules and applies("broker connections"):  # the app publishes Celery tasks
        reg.register("celery broker connections", _kombu_internals().close_pooled_connections)
    record = stop_signals.report_signals(reg)  # handlers only record; a thread logs
    for signum in stop_signals.STOP_SIGNALS:
        stop_signals.chain_signal(signum, record)
        signal.siginterrupt(signum, False)  # as gunicorn: let the request's I/O finish
    early = getattr(worker, "first_stop_signal", None)
    if early is not None:  # came while the app loaded: the drain began; not ready before the first request
        reg.record_signal(early)
        reg.begin()


def worker_exit(server: Arbiter, worker: Worker) -> None:
    """Worker, leaving its loop after the requests in flight: close its connections, then leave.

    With :data:`fast_exit`, the worker then runs the ``atexit`` handlers
    (error reporters' and tracers' flushes, logging's) and exits at once:
    tearing down an interpreter with Flask, Celery and SQLAlchemy loaded
    takes 0.15 s alone and half a second with the whole set stopping on two
    cores, which only delays the master. The exit code is gunicorn's own
    (the SystemExit on its way out). gunicorn also calls this hook in the
    master for a worker that vanished; the master has nothing to do then.
    """
    if os.getpid() != worker.pid:  # type: ignore[comparison-overlap]  # stubs: str (while it boots)
        return
    registry.current().close_all(budget=CLOSE_BUDGET)
    leaving = sys.exc_info()[1]
    if fast_exit and isinstance(leaving, SystemExit):
        code = leaving.code if isinstance(leaving.code, int) else int(leaving.code is not None)
        run_atexit_handlers()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def _kombu_internals() -> ModuleType:
    """stopright's kombu reaches, imported only where the app has loaded kombu: importing them
    loads Celery, which a master that does not preload the app would otherwise carry into every fork."""
    from stopright.upstream import kombu  # noqa: PLC0415

    return kombu


def on_exit(server: Arbiter) -> None:
    """Master, last thing before exit."""
    registry.current().close_all(budget=CLOSE_BUDGET)
