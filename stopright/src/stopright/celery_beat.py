"""Celery beat's stop: the schedule saved, connections closed, the same log lines as every process.

Beat has no shutdown signal of its own. Its SIGTERM/SIGINT handler (Celery's
``install_sync_handler``) syncs the schedule (logging, in the handler) and
raises SystemExit; SIGQUIT is left at its default (death, the last runs
unsaved: supervisord and ``honcho export`` stop with it). Here every stop
signal only records and raises SystemExit; beat's loop, unwinding, calls
``close()``, routed through the shutdown registry, which logs the signal and
closes, out of signal context. So the schedule store is synced
(``last_run_at`` saved: a restart neither repeats nor skips a run) and the
broker connections released exactly once.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

from celery.beat import PersistentScheduler

from stopright import budget, registry
from stopright import signals as stop_signals
from stopright.upstream import kombu as kombu_internals
from stopright.upstream.support import applies


class StopRightBeat:
    """Mix in before a beat scheduler class: ``class MyScheduler(StopRightBeat, PersistentScheduler)``."""

    #: The schedule store's sync and the connections' close, together, at most (seconds).
    close_budget = 1.5
    schedule_filename: str

    def setup_schedule(self) -> None:
        stop_signals.stop_with_parent()
        stop_signals.enable_stack_dumps()
        budget.announce()
        filename = getattr(self, "schedule_filename", None)
        if filename:  # beat may be first up on a fresh machine: make its directory
            Path(filename).parent.mkdir(parents=True, exist_ok=True)
        # No stop signal while the store opens: the start-up handler's SystemExit landing in
        # its imports made Celery take the store for corrupted and delete it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals.STOP_SIGNALS)
        try:
            super().setup_schedule()  # type: ignore[misc]
            reg = registry.current()
            if applies("broker connections"):
                reg.register("celery broker connections", kombu_internals.close_pooled_connections)
            reg.register("beat schedule store and connection", super().close)  # type: ignore[misc]
            for signum in stop_signals.STOP_SIGNALS:
                signal.signal(signum, functools.partial(_stop, reg))
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # one that came meanwhile: _stop now
            except SystemExit:
                self.close()  # beat's loop has not begun: nothing else would close what is open
                raise

    def close(self) -> None:
        """Beat's last act (its loop ends: a stop signal, Celery's own handler among them, or an error)."""
        registry.current().close_all(budget=self.close_budget, exiting=True)


class Scheduler(StopRightBeat, PersistentScheduler):
    """Celery's default scheduler (a schedule file), stopping right. ``install`` selects it."""


def _stop(reg: registry.ShutdownRegistry, signum: int, _frame: object) -> None:
    """Beat's handler of SIGTERM, SIGINT and SIGQUIT: record the first one and leave beat's loop.

    Signal context: no logging, no lock (the main thread may hold one). It
    raises SystemExit as Celery's own handler does (beat's loop sleeps in
    ``time.sleep``, which only an exception ends early); beat's loop catches
    it and calls ``close()``: the registry then logs "signal received" and
    closes, out of the handler. Repeats, and a signal once the close has begun (the first
    came through Celery's own handler, in the moment before this one is installed), are
    ignored: a second SystemExit
    (the parent-death signal comes once per thread of the dying parent; an
    impatient Ctrl+C) would land in the middle of that close.
    """
    if reg.recorded_signal is not None or reg.shutting_down.is_set():  # a repeat, or closing already
        return
    reg.record_signal(signum)
    raise SystemExit(0)
