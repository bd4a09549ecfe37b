"""eventlet (while Celery ships its pool): a bounded stop, and the two ways out of a greenlet the stop needs.

As stopright/upstream/gevent.py: under ``-P eventlet`` the stop's watchdog is
a green thread, a hand-back is thrown into the task's green thread from the
hub (:func:`call_in_hub`), and the last-resort deadline runs in an OS thread
(:func:`real_thread`). eventlet's ``os.write`` waits in the hub for a pipe to
be writable, which a signal handler must not do: stopright/signals.py writes
with ``posix.write``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.concurrency import eventlet as celery_eventlet  # imports no eventlet until a pool is built

#: What this module relies on that eventlet and Celery do not promise (test_upstream_shapes_pools.py).
REACHES = {
    "celery.concurrency.eventlet.TaskPool._pool (an eventlet GreenPool) / on_stop":
        "the stop waits for the pool's green threads, not for an abandoned one; the same signals",
    "eventlet.hubs.get_hub().schedule_call_global": "runs a function in the hub, every green thread paused",
    "eventlet.patcher.original('_thread') / ('time')": "an OS thread and a sleep the hub does not run",
}


class TaskPool(celery_eventlet.TaskPool):
    """Celery's eventlet pool, whose stop does not wait for a green thread the hand-back gave up on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._abandoned = threading.Event()  # patched: a green Event

    def abandon(self) -> None:
        """The stop gave up on the green threads still running: :meth:`on_stop` returns without them."""
        self._abandoned.set()

    def on_stop(self) -> None:
        signals.eventlet_pool_preshutdown.send(sender=self)
        sleep = _eventlet("eventlet").sleep
        while self._pool is not None and self._pool.running() and not self._abandoned.is_set():
            sleep(0.05)
        signals.eventlet_pool_postshutdown.send(sender=self)


def call_in_hub(fn: Callable[..., object], *args: object) -> None:
    """Run ``fn(*args)`` in eventlet's hub, soon, with every green thread paused at a switch point."""
    _eventlet("eventlet.hubs").get_hub().schedule_call_global(0, fn, *args)


def real_thread(target: Callable[[Callable[[float], None]], object]) -> None:
    """Run ``target(sleep)`` in an OS thread with a sleep that is not eventlet's (the hub may be stuck)."""
    original = _eventlet("eventlet.patcher").original
    original("_thread").start_new_thread(target, (original("time").sleep,))


def _eventlet(module: str) -> Any:
    """An eventlet module, imported when first used: importing eventlet warns that it is deprecated,
    and makes every later fork of the process warn (a test process that never runs the pool)."""
    return importlib.import_module(module)
