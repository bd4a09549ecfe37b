"""Celery's pools other than prefork, and which pool a worker really runs.

A worker's pool comes from ``--pool`` / ``-P`` or the ``worker_pool`` setting
(Celery's ``WorkersPool`` option and ``WorkController.setup_defaults``), and
``worker_init`` is sent after it is chosen and before it is built. There
:func:`resolve` maps each of Celery's pools to the one stopright stops
within the grace: prefork to stopright/upstream/celery.py's, threads to
:class:`ThreadTaskPool`, gevent and eventlet to stopright/upstream/gevent.py's
and eventlet.py's; solo is Celery's own. A pool it does not know (a
subclass of Celery's, ``-P custom``) is refused: it would be started
without the fixes the stop relies on.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Any, cast

from celery import concurrency
from celery.concurrency import base, solo, thread

from stopright.upstream import celery as celery_internals

#: What this module relies on that Celery does not promise (tests/unit/test_upstream_shapes_pools.py).
REACHES = {
    "celery.worker.WorkController.pool_cls: set before worker_init, resolved after it":
        "worker_init replaces it with the pool stopright stops (resolve)",
    "celery.concurrency.thread.TaskPool.executor / on_apply's ApplyResult.f / on_stop":
        "the threads pool's stop waits for its running futures, not for an abandoned one",
    "celery.concurrency.ALIASES / get_implementation": "what -P and worker_pool name",
}

#: Celery's pool class names (``-P``) by the kind of pool stopright treats them as.
KINDS = ("prefork", "threads", "solo", "gevent", "eventlet")


class ThreadTaskPool(thread.TaskPool):
    """Celery's threads pool, whose stop does not wait for a task thread the hand-back gave up on.

    Celery's ``on_stop`` is ``executor.shutdown(wait=True)``: it waits for every
    task thread, however long. A thread blocked in a C call (``time.sleep``, a
    socket read) cannot be handed back until that call returns; once the
    worker's stop has given up on it (:meth:`abandon`), the stop goes on
    without it: its message goes back to the queue when the consumer's
    channel closes, and the thread ends with the process.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._futures: set[Future[Any]] = set()
        self._abandoned = threading.Event()

    def on_apply(
        self, target: Callable[..., Any], args: Any = None, kwargs: Any = None,
        callback: Any = None, accept_callback: Any = None, **_: Any,
    ) -> Any:
        result = super().on_apply(target, args, kwargs, callback, accept_callback, **_)
        self._futures.add(result.f)
        result.f.add_done_callback(self._futures.discard)
        return result

    def abandon(self) -> None:
        """The stop gave up on the threads still running: :meth:`on_stop` returns without them."""
        self._abandoned.set()

    def on_stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        while not self._abandoned.is_set():
            running = [future for future in list(self._futures) if not future.done()]
            if not running:
                break
            wait_futures(running, timeout=0.05, return_when=FIRST_COMPLETED)
        base.BasePool.on_stop(self)  # thread.TaskPool's own would wait for every thread


def _ours(kind: str) -> type:
    """stopright's pool class of ``kind``; gevent's and eventlet's are imported only when asked for."""
    if kind in ("gevent", "eventlet"):
        module = importlib.import_module(f"stopright.upstream.{kind}")
        return cast(type, module.TaskPool)
    pools: dict[str, type] = {
        "prefork": celery_internals.TaskPool, "threads": ThreadTaskPool, "solo": solo.TaskPool,
    }
    return pools[kind]


def resolve(pool_cls: type | str) -> tuple[type, str]:
    """The pool to run instead of ``pool_cls`` (what Celery chose), and its kind (:data:`KINDS`).

    Each of Celery's own pools maps to stopright's; stopright's (or a subclass
    of one) stays. Raises ``LookupError`` for any other pool: stopright cannot
    stop it within the grace.
    """
    if isinstance(pool_cls, str):
        pool_cls = cast(type, concurrency.get_implementation(pool_cls))
    path = f"{pool_cls.__module__}:{pool_cls.__qualname__}"
    for kind in KINDS:
        if path == concurrency.ALIASES[kind]:
            return _ours(kind), kind
    for kind in KINDS:
        loaded = kind not in ("gevent", "eventlet") or f"stopright.upstream.{kind}" in sys.modules
        if loaded and issubclass(pool_cls, _ours(kind)):
            return pool_cls, kind
    raise LookupError(path)
