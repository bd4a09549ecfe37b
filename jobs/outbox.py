"""Publishing jobs' messages. The ledger row is the outbox: a broker outage delays no answer and loses no job.

A 202 means the row is committed; the message only says "run job X". So a
job can be accepted while the broker is down and published once it is back:

* ``POST /jobs`` publishes inline, one connection attempt at most
  (core/celery_app.py: ``broker_transport_options``). With kombu's defaults
  each request waited about 6 s on a down broker (its connection retries),
  and the job then waited for the queued lease (60 s) and a sweep.
* A job whose publish fails goes to this process's relay: a thread that
  republishes its jobs, oldest first, every :data:`RELAY_RETRY_SECONDS` until
  the broker answers, then clears their ``unpublished_since`` marks. While
  the relay holds jobs, the broker is known to be down: new jobs are stored
  marked and handed to the relay without trying the broker (answered at once).
* The relay stops with its process (shutdown registry, within its handler's
  deadline). Jobs it did not publish keep their mark; beat's sweeper
  republishes them at its next sweep (jobs/sweeper.py).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any

from core.celery_app import celery_app
from jobs import ledger
from stopright import registry

log = logging.getLogger("outbox")

#: The worker's task that runs a job (tasks/jobs.py), published by name: web and beat never import the worker.
RUN_TASK = "jobs.run"
#: While the broker is down, the relay tries it again this often.
RELAY_RETRY_SECONDS = 1.0
#: How long the relay's stop may wait for a publish in flight (shutdown registry).
RELAY_STOP_SECONDS = 1.0


def publish(job_id: str, *, handed_back: dict[str, Any] | None = None) -> None:
    """Put the job's message on the broker now, or raise (one connection attempt, no retries).

    ``handed_back``: a hand-back the ledger could not take, carried to whichever worker runs
    the job next (jobs/handbacks.py).
    """
    kwargs = {} if handed_back is None else {"handed_back": handed_back}
    celery_app.send_task(RUN_TASK, args=[job_id], kwargs=kwargs, retry=False)


def send(job_id: str, *, marked: bool) -> None:
    """After the job's row is committed: publish it now, or leave it to the relay. Never raises."""
    if not marked:
        try:
            publish(job_id)
            return
        except Exception as exc:  # noqa: BLE001 - whatever the broker says, the job is stored
            log.warning("job %s stored but not published (%s: %s); publishing it when the broker answers",
                        job_id, type(exc).__name__, exc)
        try:
            ledger.mark_unpublished([job_id])
        except Exception:  # noqa: BLE001 - the relay still has it; the queued lease is the last resort
            log.warning("job %s: could not mark it unpublished", job_id, exc_info=True)
    relay().add(job_id)


def broker_known_down() -> bool:
    """True while this process's relay holds jobs it could not publish yet."""
    current = _relay
    return current is not None and current.pid == os.getpid() and current.holding()


class Relay:
    """This process's jobs stored while the broker was down, published as soon as it answers."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._pending: collections.deque[str] = collections.deque()
        self._down_since = 0.0  # when the first job still held was handed over
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()
        registry.current().register("job outbox relay", self.stop, timeout=RELAY_STOP_SECONDS)

    def holding(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def add(self, job_id: str) -> None:
        with self._lock:
            if not self._pending:
                self._down_since = time.monotonic()
            self._pending.append(job_id)
        self._wake.set()

    def stop(self) -> None:
        """At the process's stop: unpublished jobs keep their mark for the sweeper."""
        self._stop.set()
        self._wake.set()
        self._thread.join(RELAY_STOP_SECONDS)
        with self._lock:
            left = len(self._pending)
        if left:
            log.warning("%d job(s) still unpublished at stop; beat's sweeper publishes them", left)

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set():
            with self._lock:
                batch = list(self._pending)
            if not batch:
                self._wake.wait()
                self._wake.clear()
                # Whoever handed us a job has just seen the broker fail (or knows it is down).
                self._stop.wait(RELAY_RETRY_SECONDS)
                continue
            published = []
            for job_id in batch:
                if self._stop.is_set():
                    break
                try:
                    publish(job_id)
                except Exception:  # noqa: BLE001 - still down: try again later
                    break
                published.append(job_id)
            sent += len(published)
            if published:
                with self._lock:
                    for _ in published:
                        self._pending.popleft()
                try:
                    ledger.mark_published(published)
                except Exception:  # noqa: BLE001 - the sweeper republishes them: a harmless duplicate
                    log.warning("could not clear the unpublished mark of %d job(s)", len(published),
                                exc_info=True)
            if len(published) < len(batch):
                self._stop.wait(RELAY_RETRY_SECONDS)
            elif not self.holding():
                log.warning("broker back: published %d job(s) stored while it was down (for %.1f s)",
                            sent, time.monotonic() - self._down_since)
                sent = 0


_relay: Relay | None = None
_relay_lock = threading.Lock()


def relay() -> Relay:
    """This process's relay, started on first need (a forked child starts its own)."""
    global _relay
    with _relay_lock:
        if _relay is None or _relay.pid != os.getpid():
            _relay = Relay()
        return _relay
