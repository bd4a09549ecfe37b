"""gevent: Celery's gevent pool with a bounded stop, and the two ways out of a greenlet the stop needs.

Under ``-P gevent`` every thread of the worker is a greenlet (Celery
monkey-patches before anything else is imported), the stop's watchdog
included: it runs whenever the task greenlets wait (a patched sleep or
socket read). A hand-back is thrown into the task's greenlet from the hub
(:func:`call_in_hub`), where every other greenlet is paused at a switch
point. A task that never yields holds up the hub and the watchdog with it:
:func:`real_thread` runs the last-resort deadline in an OS thread.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from celery.concurrency import gevent as celery_gevent  # imports no gevent until a pool is built

#: What this module relies on that gevent and Celery do not promise (test_upstream_shapes_pools.py).
REACHES = {
    "celery.concurrency.gevent.TaskPool._pool (a gevent.pool.Pool) / on_stop":
        "the stop waits for the pool's greenlets, not for an abandoned one",
    "gevent.get_hub().loop.run_callback": "runs a function in the hub, every greenlet paused",
    "gevent.monkey.get_original('_thread', 'start_new_thread') / ('time', 'sleep')":
        "an OS thread and a sleep the hub does not run",
}


class TaskPool(celery_gevent.TaskPool):
    """Celery's gevent pool, whose stop does not wait for a greenlet the hand-back gave up on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._abandoned = threading.Event()  # patched: a gevent Event

    def abandon(self) -> None:
        """The stop gave up on the greenlets still running: :meth:`on_stop` returns without them."""
        self._abandoned.set()

    def on_stop(self) -> None:
        while self._pool is not None and not self._abandoned.is_set():
            if self._pool.join(timeout=0.05):
                break


def call_in_hub(fn: Callable[..., object], *args: object) -> None:
    """Run ``fn(*args)`` in gevent's hub, soon, with every greenlet paused at a switch point."""
    importlib.import_module("gevent").get_hub().loop.run_callback(fn, *args)


def real_thread(target: Callable[[Callable[[float], None]], object]) -> None:
    """Run ``target(sleep)`` in an OS thread with a sleep that is not gevent's (the hub may be stuck)."""
    original = importlib.import_module("gevent.monkey").get_original
    original("_thread", "start_new_thread")(target, (original("time", "sleep"),))
