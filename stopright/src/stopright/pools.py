"""Every pool a Celery user runs, stopped the same bounded way: how each one hands a task back.

The worker's stop (stopright/worker_stop.py) is the same for every pool:
quiet, the grace, the hand-back, then exit within the budget. What differs
is where a task runs, so how the hand-back (:class:`stopright.HandBack`
raised inside the task) reaches it, and what the stop does about a task it
did not reach within :data:`stopright.worker_stop.HANDBACK_SECONDS`:

=========  ===============================  ===========================================
pool       the hand-back reaches the task   a task not handed back in time
=========  ===============================  ===========================================
prefork    SIGUSR2 to its pool child        the child is SIGKILLed; Celery requeues
solo       SIGUSR2 to the MainProcess's     requeued by the stop; the worker exits now
           main thread, where it runs       (its main thread is stuck in the task)
threads    raised in its thread, at the     the thread is abandoned: its message goes
           next bytecode                    back when the consumer's channel closes
gevent,    thrown into its greenlet from    as threads (the greenlet is abandoned)
eventlet   the hub, where it waits
=========  ===============================  ===========================================

The worker never signals itself to hand back (``Request.worker_pid`` is the
MainProcess itself under threads, and a greenlet's id under gevent and
eventlet). Which pool a worker runs is decided once, at ``worker_init``
(:func:`choose`): a ``-P`` on the command line or a ``worker_pool`` setting
naming one of Celery's pools gets stopright's version of it; any other pool
stops the start with a message.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, cast

from stopright import handback
from stopright.handback import HANDBACK_SIGNAL
from stopright.signals import raw_write
from stopright.upstream import celery_pools

log = logging.getLogger("stopright")

#: The start-up WARNING of each pool whose tasks the hand-back cannot always reach: what happens instead.
LIMITS = {
    "threads": ("pool threads: the hand-back cannot reach a task blocked in a C call (time.sleep, a socket "
                "read without timeout) until that call returns; such a task still running 0.5 s after the "
                "grace is abandoned: its message goes back to the queue when the worker's broker connection "
                "closes, and it is cut when the worker exits (it runs again from the start)"),
    "gevent": ("pool gevent: the hand-back cannot reach a task that does not yield (CPU-bound, or blocked in "
               "a call gevent does not make cooperative); such a task still running 0.5 s after the grace is "
               "abandoned as with threads, and one that never yields holds up the whole worker until the "
               "stop's last-resort deadline, which exits it (code 1)"),
    "eventlet": ("pool eventlet: the hand-back cannot reach a task that does not yield (CPU-bound, or "
                 "blocked in a call eventlet does not make cooperative); such a task still running 0.5 s "
                 "after the grace is abandoned as with threads, and one that never yields holds up the whole "
                 "worker until the stop's last-resort deadline, which exits it (code 1)"),
}

REFUSED = ("stopright: the worker's pool {path} is not one stopright can stop within the grace. Run it "
           "with one of Celery's pools (-P prefork, threads, solo, gevent or eventlet; stopright uses its "
           "own version of each), or make yours a subclass of stopright's (stopright.upstream.celery:"
           "TaskPool for prefork, stopright.upstream.celery_pools:ThreadTaskPool for threads).")


class Pool:
    """The worker's pool as its stop sees it: its kind and the pool object (set once the pool is built)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pool: Any = None  # Celery's TaskPool instance, from worker_ready

    @property
    def has_children(self) -> bool:
        return self.kind == "prefork"

    @property
    def limit(self) -> str | None:
        return LIMITS.get(self.kind)

    def start(self, pool: Any) -> None:
        """MainProcess, worker ready: how this process delivers a hand-back; log what is not supported."""
        self.pool = pool
        if self.kind == "solo":  # the task runs in this very thread
            signal.signal(HANDBACK_SIGNAL, handback.interrupt)
        if self.limit:
            log.warning("%s", self.limit)

    def hand_back(self, request: Any) -> None:
        """Ask the task of ``request`` to hand back now (from the stop's watchdog)."""
        if self.kind == "prefork":
            _kill(request.worker_pid, HANDBACK_SIGNAL)
        elif self.kind == "solo":
            signal.pthread_kill(cast(int, threading.main_thread().ident), HANDBACK_SIGNAL)
        elif self.kind == "threads":
            handback.interrupt_run(request.id)
        else:
            self._green().call_in_hub(handback.interrupt_green, request.id)

    def give_up(self, request: Any, seconds: float) -> None:
        """``request`` did not hand back within ``seconds``: what each pool can do about it (logged)."""
        if self.kind == "prefork":
            log.error("pool child %s did not hand back task %s[%s] within %.1f s: SIGKILL",
                      request.worker_pid, request.name, request.id, seconds)
            _kill(request.worker_pid, signal.SIGKILL)
        elif self.kind == "solo":
            log.error("task %s[%s] did not hand back within %.1f s (blocked where no signal reaches it): "
                      "requeued; the worker exits now", request.name, request.id, seconds)
            request.reject(requeue=True)
        else:
            log.error("task %s[%s] did not hand back within %.1f s (%s): abandoned; its message goes back to "
                      "the queue when the broker connection closes", request.name, request.id, seconds,
                      "blocked in a C call" if self.kind == "threads" else "it did not yield")
            self.pool.abandon()

    def _green(self) -> Any:
        from importlib import import_module  # noqa: PLC0415 - gevent or eventlet, only under that pool

        return import_module(f"stopright.upstream.{self.kind}")

    def last_resort(self, seconds: float, what: str) -> None:
        """Exit (code 1) ``seconds`` from now, even with the hub stuck (gevent, eventlet): an OS thread."""
        if self.kind not in ("gevent", "eventlet"):
            return
        message = f"stop deadline passed: {what}; worker exits now (exit code 1)\n".encode()

        def wait(sleep: Callable[[float], None]) -> None:
            sleep(seconds)
            raw_write(2, message)  # eventlet's os.write waits in its hub
            os._exit(1)

        self._green().real_thread(wait)


#: What :func:`choose` refused, for the worker's start check to raise (stopright/checks.py): an
#: error raised in ``worker_init`` itself would only be logged by Celery, and the worker would start.
refusals: list[str] = []


def choose(worker: Any) -> Pool:
    """``worker_init``: run stopright's version of the pool Celery chose (``-P``, ``worker_pool``).

    A pool stopright cannot stop is refused: :data:`refusals` says what to change.
    """
    try:
        pool_cls, kind = celery_pools.resolve(worker.pool_cls)
    except LookupError as unknown:
        refusals.append(REFUSED.format(path=unknown.args[0]))
        return Pool("prefork")
    worker.pool_cls = pool_cls
    handback.configure({"threads": "thread", "gevent": "green", "eventlet": "green"}.get(kind, "signal"))
    return Pool(kind)


def _kill(pid: int | None, signum: int) -> None:
    if pid:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
