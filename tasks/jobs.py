"""The Celery tasks: run one job from the ledger; requeue stranded jobs.

A message carries only a job id; the ledger row says what to run. The task
claims the row first, so a message that arrives twice (handed back by a
shutdown, restored after a crash, republished by the sweeper) never runs a
finished job or one that is running elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

from celery.exceptions import Reject

from app import ledger
from app.config import get_settings
from tasks.celery_app import celery_app
from tasks.kinds import KINDS

log = logging.getLogger("jobs")


class HandBack(BaseException):
    """Raised inside a running job when the worker's grace budget is used up.

    A BaseException, so job code catching ``Exception`` cannot swallow it.
    Sent by the worker MainProcess as SIGUSR2 to the pool child
    (tasks/lifecycle.py).
    """


_running = threading.Event()  # set while a job runs in this pool child


def interrupt_running_job() -> None:
    """SIGUSR2 handler in pool children: hand the running job back, if any."""
    if _running.is_set():
        raise HandBack()


class _Lease:
    """Renews the running job's lease while it runs; the sweeper requeues it if we die.

    One thread per pool child, started with the first job, wakes every
    ``lease / 3`` and renews the running job once it has run that long.
    Starting a job only swaps a tuple: no thread to start (that cost a
    quarter of a short job's CPU) and no thread to wake.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: tuple[str, int, float] | None = None  # id, attempt, lease seconds
        self._due = 0.0
        self._thread_pid: int | None = None

    @contextlib.contextmanager
    def held(self, job_id: str, attempt: int, lease: float) -> Iterator[None]:
        with self._lock:
            self._job, self._due = (job_id, attempt, lease), time.monotonic() + lease / 3
            if self._thread_pid != os.getpid():  # first job here (threads do not survive fork)
                self._thread_pid = os.getpid()
                threading.Thread(target=self._renew_forever, args=(lease / 3,), name="lease",
                                 daemon=True).start()
        try:
            yield
        finally:
            with self._lock:
                self._job = None

    def _renew_forever(self, tick: float) -> None:
        # A renewal comes between one and two ticks after it is due: well
        # inside the lease (three ticks).
        while True:
            time.sleep(tick)
            with self._lock:
                job, due = self._job, self._due
                if job is None or time.monotonic() < due:
                    continue
                self._due = time.monotonic() + tick
            job_id, attempt, lease = job
            if not ledger.renew(job_id, attempt, lease=lease):  # no longer ours: stop renewing it
                with self._lock:
                    if self._job is job:
                        self._due = float("inf")


_lease = _Lease()


@celery_app.task(name="jobs.run")
def run_job(job_id: str) -> None:
    settings = get_settings()
    job = ledger.claim(job_id, lease=settings.job_lease_seconds,
                       max_attempts=settings.job_max_attempts)
    if job is None:
        log.info("job %s is finished or running elsewhere; message dropped", job_id)
        return
    attempt = job["attempts"]
    try:
        model, run = KINDS[job["task"]]  # a kind removed since the job was stored: failed
        with _lease.held(job_id, attempt, settings.job_lease_seconds):
            _running.set()
            try:
                result = run(model.model_validate(job["args"]))
            finally:
                _running.clear()
    except HandBack:
        ledger.hand_back(job_id, attempt)
        log.warning("job %s handed back to the queue (attempt %d interrupted by shutdown)",
                    job_id, attempt)
        raise Reject("handed back by shutdown", requeue=True) from None
    except Exception as exc:
        ledger.fail(job_id, attempt, f"{type(exc).__name__}: {exc}")
        log.exception("job %s failed", job_id)
        return
    ledger.succeed(job_id, attempt, result)


@celery_app.task(name="jobs.requeue_stranded")
def requeue_stranded() -> int:
    """Periodic (beat): republish jobs whose message was lost or whose worker died."""
    ids = ledger.sweep_stranded(queued_lease=get_settings().job_queued_lease_seconds)
    for job_id in ids:
        run_job.delay(job_id)
    if ids:
        log.warning("requeued %d stranded job(s): %s", len(ids), ", ".join(ids))
    return len(ids)
