"""Celery's consumer (``worker_consumer``): reconnects fast, wakes on a stop, hands back on a lost broker.

:class:`Consumer` reconnects within seconds (Celery: 2 s growing to 30 s), a
stop signal wakes its event loop at once (:func:`wake_on_signals`; under
gevent and eventlet, Celery's ``synloop``, within :data:`STOP_CHECK_SECONDS`),
and a lost broker connection first calls :data:`connection_lost_hooks`
(stopright/celery_worker.py hands the running late-ack tasks back).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from stopright.upstream.celery import running_requests

#: What this module relies on that Celery does not promise (checked by tests/unit/test_upstream_shapes.py).
REACHES = {
    "celery.worker.consumer.Consumer.on_ready / ensure_connected / hub.readers": "overridden, read",
    "celery.worker.consumer.Consumer.on_connection_error_after_connected: before the reconnection":
        "the running late-ack tasks are handed back first (Request.task.acks_late, .acknowledged)",
    "celery.worker.loops.synloop: drain_events(timeout=2.0) between should_stop checks; loop_args":
        "under gevent and eventlet each wait is capped (notice_stops_soon)",
}

logger = logging.getLogger("celery.worker.consumer")

RETRY_START_SECONDS = 0.5
RETRY_STEP_SECONDS = 0.5
RETRY_MAX_SECONDS = 2.0


_wakeup_fd: int | None = None  # read end of this process's signal wakeup pipe
_chained_fd = -1  # the wakeup descriptor the app had set before ours: it still gets every signal


def wake_on_signals(hub: Any) -> None:
    """Let a signal end the event loop's poll at once; call each time the loop (re)starts.

    Python runs a signal handler between bytecodes and then resumes the
    interrupted ``epoll`` with its remaining timeout (PEP 475), so the loop
    notices ``should_stop`` only when the poll times out (up to a second).
    With ``signal.set_wakeup_fd`` writing to a pipe the hub reads, the signal
    makes the poll return. The loop's hub is reset after a lost broker
    connection (its readers dropped), so the reader is added again at every
    start: without it, the first stop after a reconnection took 1.5 s instead
    of 0.1 s (measured on RabbitMQ). A process has one wakeup descriptor: one
    the app had set (an asyncio loop's, a library's) is chained, every signal
    byte passed on to it (:func:`_drain`), and said so.
    """
    global _wakeup_fd, _chained_fd
    if hub is None:
        return
    if _wakeup_fd is None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        _chained_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        _wakeup_fd = read_fd
        if _chained_fd != -1:
            logging.getLogger("stopright").warning(
                "signal wakeup descriptor %d was already set: stopright's event-loop wake-up passes every "
                "signal on to it", _chained_fd)
    if _wakeup_fd not in hub.readers:
        hub.add_reader(_wakeup_fd, _drain, _wakeup_fd)


def _drain(fd: int) -> None:
    try:
        while data := os.read(fd, 512):
            if _chained_fd != -1:
                try:
                    os.write(_chained_fd, data)
                except OSError:  # full (a wake-up is pending there anyway) or closed by its owner
                    pass
    except BlockingIOError:
        pass


#: Under gevent and eventlet (Celery's ``synloop``): how long one wait for the broker may last, so
#: that the loop notices a stop that soon (Celery: 2 s, then one more wait after it noticed).
STOP_CHECK_SECONDS = 0.25


def notice_stops_soon(connection: Any) -> None:
    """Cap every ``drain_events`` wait of ``connection`` at :data:`STOP_CHECK_SECONDS`.

    ``synloop`` checks ``state.should_stop`` only between two waits of 2 s,
    and waits once more after seeing it: a stop under gevent began Celery's
    own shutdown up to 4 s late, after the grace and the hand-back, and the
    close overran its deadline (measured). Called at each start of the loop
    (a reconnection brings a new connection).
    """
    drain = connection.drain_events
    if getattr(drain, "capped", False):
        return

    def drain_events(timeout: float | None = None, **kwargs: Any) -> Any:
        capped = STOP_CHECK_SECONDS if timeout is None else min(timeout, STOP_CHECK_SECONDS)
        return drain(timeout=capped, **kwargs)

    drain_events.capped = True  # type: ignore[attr-defined]
    connection.drain_events = drain_events


#: Called with (the lost connection, the running late-ack requests) when the consumer loses its broker.
connection_lost_hooks: list[Callable[[Any, list[Any]], object]] = []


def forget_delivery(request: Any) -> None:
    """The broker took this delivery back (its connection is gone): Celery must neither ack nor reject it.

    Either would go to the dead channel and log ``Couldn't reject ...`` at
    CRITICAL with a traceback; ``Request.reject`` and ``acknowledge`` do
    nothing for a request already marked acknowledged.
    """
    request.acknowledged = True


class Consumer(CeleryConsumer):
    """Celery's consumer: reconnects every 0.5 to 2 s (Celery: 2 to 30 s), woken by stop signals.

    Celery retries a lost broker connection 2, 4, 6 ... seconds apart, up
    to 30 s between tries (kombu's ``ensure_connection`` defaults, not a
    setting): after a 6 s Redis outage the worker came back 6 s after Redis
    did. A try against a broker that refuses connections costs microseconds.
    """

    def on_ready(self) -> None:
        """Each start of the event loop, the first and after every reconnection."""
        wake_on_signals(self.hub)
        super().on_ready()

    def on_connection_error_after_connected(self, exc: BaseException) -> Any:
        """The broker connection is lost: first :data:`connection_lost_hooks` (the running late-ack
        tasks are handed back, stopright/celery_worker.py), then Celery's reconnection."""
        running = [r for r in running_requests() if r.task.acks_late and not r.acknowledged
                   and getattr(r.task, "hand_back_on_connection_loss", True)]
        for hook in connection_lost_hooks:
            try:
                hook(self.connection, running)
            except Exception:  # noqa: BLE001 - the reconnection must go on
                logger.exception("hand-back on connection loss failed")
        return super().on_connection_error_after_connected(exc)

    def loop_args(self) -> Any:
        """Each start of the event loop: under gevent and eventlet (no hub), notice a stop soon."""
        if self.hub is None and self.connection is not None:
            notice_stops_soon(self.connection)
        return super().loop_args()

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=RETRY_START_SECONDS,
            interval_step=RETRY_STEP_SECONDS, interval_max=RETRY_MAX_SECONDS)
        return super().ensure_connected(conn)
