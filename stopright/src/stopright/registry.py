"""The shutdown registry: one per process, closing what that process opened.

Every resource that holds a connection (SQLAlchemy engine, Redis client,
Celery's broker connection and producer pools) registers a named close
handler in the process that opened it. When the process stops, the handlers
run once, newest first (a client is closed before the pool it came from),
each in its own thread with a time limit: one that raises is logged and the
rest still run, one that hangs is abandoned so the process can still exit
before the platform's SIGKILL (honcho: 5 s; Heroku, Kubernetes: 30 s).

Who calls :meth:`ShutdownRegistry.close_all`:
  gunicorn worker  ``worker_exit``  (stopright/gunicorn_hooks.py)
  gunicorn master  ``on_exit``      (stopright/gunicorn_hooks.py)
  Celery worker    ``worker_shutdown`` in the MainProcess,
                   ``worker_process_shutdown`` in each pool child (stopright/celery_worker.py)
  Celery beat      scheduler ``close()`` (stopright/celery_beat.py)
  any other program  itself, on its way out (the demo's broker/launcher.py)

Every process logs the same sequence, so a log shows at a glance who stopped
and how: ``signal received`` -> ``graceful shutdown started`` ->
``closing X`` -> ``closed X`` -> ``shutdown complete in N ms``.

Signal handlers only record (:meth:`ShutdownRegistry.record_signal`, a
:class:`stopright.signals.Wakeup`); the first two lines come from the process's loop or a
watcher thread (:meth:`ShutdownRegistry.begin`), never from the handler.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("stopright")

DEFAULT_HANDLER_TIMEOUT = 1.0
#: What a handler gets when a stop's budget is spent: a close that does not hang takes milliseconds.
MIN_HANDLER_SECONDS = 0.05


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "closed", "failed" or "timed out"
    elapsed: float


@dataclass(frozen=True)
class _Handler:
    name: str
    close: Callable[[], object]
    timeout: float
    forks: bool | None = None  # see ShutdownRegistry.register
    same_thread: bool = False


class ShutdownRegistry:
    """Named close handlers of one process, run once in reverse order."""

    def __init__(self, *, handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._handler_timeout = handler_timeout
        self._clock = clock
        self._handlers: list[_Handler] = []
        self._lock = threading.Lock()
        self._started_at: float | None = None
        self._closed = False
        #: The first stop signal, as :meth:`record_signal` noted it (a signal handler).
        self.recorded_signal: int | None = None
        self._signal_at = 0.0
        self.shutting_down = threading.Event()

    # -- registration -----------------------------------------------------
    def register(self, name: str, close: Callable[[], object], *, timeout: float | None = None,
                 forks: bool | None = None, same_thread: bool = False) -> None:
        """Add a close handler; it runs at shutdown, before those registered earlier.

        Each handler runs on a thread of its own, so that ``timeout`` can bound
        it. ``same_thread=True``: on the thread that closes the registry instead
        (the process's main thread in gunicorn's workers and master, Celery's
        MainProcess and pool children, and beat), for a closer bound to its
        thread (SQLite's ``check_same_thread``); no timeout then.

        ``forks``: whether a child this process forks after now inherits the handler.
        ``True``: it does, and runs it at its own stop; for a close that closes only
        what the calling process opened (SQLAlchemy's ``engine.dispose`` when no
        connection was opened before the fork, a redis-py client). Never for a
        connection opened before the fork (libpq, AMQP): in the child, closing it
        would end the parent's session; a child must drop it instead.
        ``False``: it does not; the child opens and registers its own (or never uses it).
        ``None`` (the default): it does not, and :func:`warn_left_behind` names it at the
        start of a process that forks (Celery's prefork pool, gunicorn ``--preload``).
        """
        handler = _Handler(name, close, self._handler_timeout if timeout is None else timeout, forks,
                           same_thread)
        with self._lock:
            late = self._closed
            if not late:
                self._handlers.append(handler)
        if late:
            # Opened while closing (a request that raced the shutdown): close it now.
            log.warning("%s registered after shutdown; closing it now", name)
            self._run(handler)

    def names(self) -> list[str]:
        with self._lock:
            return [h.name for h in self._handlers]

    def left_behind(self) -> list[str]:
        """Handlers a forked child would not inherit and was not told about (``forks=None``)."""
        with self._lock:
            return [h.name for h in self._handlers if h.forks is None]

    def _inherit(self, parent: ShutdownRegistry) -> None:
        """In a forked child: the parent's ``forks=True`` handlers (read without its lock, which
        another thread of the parent may have held at the fork)."""
        self._handlers = [h for h in list(parent._handlers) if h.forks]

    # -- the shutdown sequence --------------------------------------------
    def record_signal(self, signum: int) -> None:
        """In a signal handler: note the stop signal (the first one) and its time; nothing else.

        A Python signal handler runs in the main thread between two
        bytecodes, maybe while that thread holds this registry's lock or a
        logging handler's lock: taking either here (both non-reentrant)
        would deadlock the process. So plain attribute assignments only, as
        gunicorn's arbiter ("NO LOGGING, just queue the signal"); the log
        lines come from :meth:`begin`, called by the process's loop or a
        watcher thread (:func:`report_signals`, :class:`Wakeup`).
        """
        if self.recorded_signal is None:
            self._signal_at = self._clock()
            self.recorded_signal = signum

    def signal_received(self, signum: int, detail: str = "") -> bool:
        """Outside a signal handler (a server's loop calling us): record the signal and begin."""
        self.record_signal(signum)
        return self.begin(detail)

    def begin(self, detail: str = "") -> bool:
        """Mark the process as shutting down, logging the recorded signal first; True the first time only.

        Never from a signal handler (it logs and locks): see :meth:`record_signal`.
        The start lines are logged under the lock, so a ``close_all`` racing in
        another thread logs its ``closing`` lines after them.
        """
        with self._lock:
            if self._started_at is not None:
                return False
            signum = self.recorded_signal
            self._started_at = self._clock() if signum is None else self._signal_at
            if signum is not None:
                log.info("signal received: %s", signal.Signals(signum).name)
            log.info("graceful shutdown started%s", f" ({detail})" if detail else "")
        self.shutting_down.set()
        return True

    @property
    def elapsed_ms(self) -> int:
        started = self._started_at
        return 0 if started is None else round((self._clock() - started) * 1000)

    def close_all(self, budget: float | None = None, *, exiting: bool | None = None) -> list[Outcome]:
        """Run every handler once, newest first; later calls do nothing.

        ``exiting``: the process leaves right after (default: when a stop signal
        was recorded); repeated stop signals are then ignored (:func:`_ignore_stop_signals`).

        ``budget`` bounds the whole sequence: each handler gets its own
        timeout or what is left of the budget, whichever is less (but at
        least :data:`MIN_HANDLER_SECONDS`, enough for a close that does not
        hang), so a process whose stop is running late still closes
        everything it can in the time it has.
        """
        self.begin()
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            handlers = list(reversed(self._handlers))
            self._handlers.clear()
        deadline = None if budget is None else self._clock() + budget
        outcomes = []
        for handler in handlers:
            left = None if deadline is None else max(MIN_HANDLER_SECONDS, deadline - self._clock())
            outcomes.append(self._run(handler, left))
        log.info("shutdown complete in %d ms", self.elapsed_ms)
        if exiting or (exiting is None and self.recorded_signal is not None):
            _ignore_stop_signals()
        return outcomes

    def _run(self, handler: _Handler, left: float | None = None) -> Outcome:
        timeout = handler.timeout if left is None else min(handler.timeout, left)
        log.info("closing %s", handler.name)
        errors: list[BaseException] = []

        def target() -> None:
            try:
                handler.close()
            except BaseException as exc:  # noqa: BLE001 - isolate every handler
                errors.append(exc)

        started = self._clock()
        if handler.same_thread:
            target()
            thread = None
        else:
            thread = threading.Thread(target=target, name=f"close-{handler.name}", daemon=True)
            thread.start()
            thread.join(timeout)
        elapsed = self._clock() - started
        if thread is not None and thread.is_alive():
            log.error("closing %s timed out after %.1f s; abandoned", handler.name, timeout)
            frame = sys._current_frames().get(thread.ident or 0)
            if frame is not None:
                stack = "".join(traceback.format_stack(frame)).rstrip()
                log.error("closing %s was stuck here:\n%s", handler.name, stack)
            return Outcome(handler.name, "timed out", elapsed)
        if errors:
            log.error("closing %s failed: %r", handler.name, errors[0],
                      exc_info=(type(errors[0]), errors[0], errors[0].__traceback__))
            return Outcome(handler.name, "failed", elapsed)
        log.info("closed %s in %d ms", handler.name, round(elapsed * 1000))
        return Outcome(handler.name, "closed", elapsed)


#: Every signal a manager stops with (SIGQUIT: supervisord's and `honcho export`'s): all graceful.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _ignore_stop_signals() -> None:
    """Once everything is closed, a repeated stop signal must not turn the exit into a death by signal.

    CPython's finalization puts the default action back on every signal with a
    Python handler (not on an ignored one), and managers repeat the stop: foreman
    (SIGINT, then SIGTERM), honcho (the group's SIGTERM, then the ``sh -c``
    wrapper's death). Only the main thread may set handlers; elsewhere it stays as it was.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


_registry: ShutdownRegistry | None = None
_registry_pid: int | None = None


def current() -> ShutdownRegistry:
    """This process's registry; a forked child gets a fresh one, with only the ``forks=True`` handlers.

    A child must never close (or even use) the parent's connections, so the
    parent's other handlers are not inherited: the child's resources register
    again when it reopens them.
    """
    global _registry, _registry_pid
    if _registry is None or _registry_pid != os.getpid():
        fresh = ShutdownRegistry()
        if _registry is not None:
            fresh._inherit(_registry)
        _registry, _registry_pid = fresh, os.getpid()
    return _registry


def register(name: str, close: Callable[[], object], *, timeout: float | None = None,
             forks: bool | None = None, same_thread: bool = False) -> None:
    """Close ``close`` when this process stops (its registry; see :meth:`ShutdownRegistry.register`)."""
    current().register(name, close, timeout=timeout, forks=forks, same_thread=same_thread)


def warn_left_behind(forking: str) -> None:
    """At the start of a process about to fork children (``forking`` says which): name what they would lack.

    An app factory run before the fork (Celery's MainProcess imports the app;
    gunicorn ``--preload``) registers its closers in the parent; a child that
    then opens its own connections would leave them unclosed at its stop
    (PostgreSQL: ``unexpected EOF``) unless the handler is inherited or
    registered again in the child.
    """
    names = current().left_behind()
    if names:
        log.warning("%s: the children it forks do not inherit %s (registered here before the fork): what "
                    "they open stays open at their stop. Register with forks=True a close that closes only "
                    "the calling process's own connections (SQLAlchemy engine.dispose, a redis-py client); "
                    "else register it again in the child (Celery worker_process_init, gunicorn post_fork), "
                    "or with forks=False if children never use it", forking, ", ".join(names))
