"""The Celery task that runs one job from the ledger, and what keeps a run honest under faults.

A message carries only a job id; the ledger row says what to run. The task
claims the row first, so a message that arrives twice (handed back by a
shutdown, restored after a crash, republished by the sweeper) never runs a
finished job or one that is running elsewhere.

Faults, all in the pool child that runs the job:

* **The database away** (PostgreSQL restarting, SQLite's disk full): the
  run's ledger writes (claim, result) wait it out with backoff
  (:func:`_stored`) instead of failing the job or losing its result. Only the
  job's own exception marks it failed. The worker's hand-back signal
  (SIGUSR2, after the grace) still ends the wait.
* **The lease keeper** (:class:`_Lease`) survives any exception and retries a
  failed renewal within a second, so a live run renews as soon as the
  database is back, before the sweeper can take the job back.
* **A run cut off from the database** stops itself once its lease lapses
  (:class:`LeaseLapsed`, by this host's clock), a renewal period before the
  sweeper may give the job to another host: a job never runs twice at once.
* **A run whose job was taken back** anyway (this child was frozen) stops
  when its keeper next reaches the database: :class:`TakenOver`, raised in
  the job by SIGUSR2 like a hand-back, and the row is left to the new run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TypeVar

from celery.exceptions import Reject

from core import db, outages
from core.celery_app import celery_app
from core.config import get_settings
from jobs import handbacks, ledger, outbox
from jobs.kinds import KINDS
from stopright.handback import HANDBACK_SIGNAL, HANDED_BACK, HandBack, interruptible, stop_run
from stopright.worker_stop import HANDBACK_SECONDS

log = logging.getLogger("jobs")

#: The task's name: web and beat publish it by name (jobs/outbox.py), never importing this module.
TASK_NAME = "jobs.run"

T = TypeVar("T")

#: Waits between tries of a ledger write while the database is away: doubled up to the maximum.
STORE_RETRY_FIRST_SECONDS = 0.1
STORE_RETRY_MAX_SECONDS = 2.0
#: After a failed renewal, the lease keeper tries again this soon (at most half a renewal period).
RENEW_RETRY_SECONDS = 0.5
#: A hand-back's ledger write at a stop: done well before the MainProcess's SIGKILL, or given up.
HAND_BACK_DB_SECONDS = HANDBACK_SECONDS * 0.6


class TakenOver(BaseException):
    """Raised inside a running job whose lease keeper found the job no longer this run's.

    The sweeper took the job back (its lease lapsed on two sweeps) and another
    run may have started: this one must stop, without touching the row.
    Raised in the job by the lease keeper thread (``stopright.stop_run``), like a hand-back.
    """


class LeaseLapsed(TakenOver):
    """Raised inside a running job whose lease lapsed before the keeper could renew it.

    The database was unreachable for a whole lease (this host cut off): from
    now on the sweeper may give the job to another run, so this one stops
    first, without touching the row (it could not anyway).
    """


class _Lease:
    """Renews the running job's lease while it runs; the sweeper takes the job back if we die.

    One thread per pool child, started with the first job, renews the running
    job's lease every ``lease / 3`` (one renewal period). Starting a job only
    swaps a tuple: no thread to start (that cost a quarter of a short job's
    CPU) and no thread to wake.

    Why it never dies: a thread that raised is gone for good, and a job whose
    lease is never renewed again looks dead to the sweeper, which started a
    second run beside the live one (a database outage ran jobs five
    times in parallel and failed them). Every exception is caught and logged
    once per streak, and a failed renewal is retried within
    :data:`RENEW_RETRY_SECONDS`, well inside the sweeper's confirmation window
    (one renewal period, jobs/ledger.py). The thread blocks SIGUSR2, so the
    worker's hand-back signal always reaches the main thread, where the job runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: tuple[str, int, float] | None = None  # id, attempt, lease seconds
        self._due = 0.0
        self._valid_until = 0.0  # monotonic: the lease this run last wrote ends then, at the latest
        self._tick = 1.0  # the renewal period of the last job held
        self._wake = threading.Event()
        self._thread_pid: int | None = None

    @contextlib.contextmanager
    def held(self, job_id: str, attempt: int, lease: float, lease_until: datetime) -> Iterator[None]:
        tick = lease / ledger.RENEWALS_PER_LEASE
        left = (lease_until - ledger.utcnow()).total_seconds()  # the claim's lease, on this clock
        with self._lock:
            if tick < self._tick:  # the lease setting changed (tests): the keeper sleeps the old period
                self._wake.set()
            self._job, self._due, self._tick = (job_id, attempt, lease), time.monotonic() + tick, tick
            self._valid_until = time.monotonic() + min(left, lease)
            if self._thread_pid != os.getpid():  # first job here (threads do not survive fork)
                self._thread_pid = os.getpid()
                threading.Thread(target=self._renew_forever, name="lease", daemon=True).start()
        try:
            yield
        finally:
            with self._lock:
                self._job = None

    def _renew_forever(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {HANDBACK_SIGNAL})
        failing_since: float | None = None
        failing_job: tuple[str, int, float] | None = None
        while True:
            with self._lock:
                job, due, tick = self._job, self._due, self._tick
            retry = min(RENEW_RETRY_SECONDS, tick / 2)
            if failing_since is not None and job is not failing_job:  # that run is over
                failing_since = None
            wait = tick if job is None else due - time.monotonic()
            if wait > 0:
                if self._wake.wait(min(wait, tick)):
                    self._wake.clear()
                continue
            job_id, attempt, lease = job
            started = time.monotonic()
            try:
                # Bounded by the lease's end, so a database that does not answer cannot
                # hold this thread past the moment the run must stop.
                with db.deadline(max(self._valid_until - started, 0.05)):
                    renewed = ledger.renew(job_id, attempt, lease=lease)
            except Exception as exc:  # noqa: BLE001 - whatever it is, keep renewing
                if failing_since is None:
                    failing_since, failing_job = started, job
                    log.warning("job %s: cannot renew the lease of attempt %d (%s: %s); retrying every "
                                "%.1f s", job_id, attempt, type(exc).__name__,
                                (str(exc).splitlines() or [""])[0][:200], retry)
                with self._lock:
                    if self._job is not job:
                        continue
                    if time.monotonic() < self._valid_until:
                        self._due = min(time.monotonic() + retry, self._valid_until)
                        continue
                    self._due = float("inf")
                    self._stop_lapsed_run(job_id, attempt, time.monotonic() - failing_since)
                continue
            if failing_since is not None:
                log.warning("job %s: lease of attempt %d renewed again after %.1f s", job_id, attempt,
                            time.monotonic() - failing_since)
                failing_since = None
            with self._lock:
                if self._job is not job:
                    continue
                self._due = started + tick if renewed else float("inf")
                if renewed:
                    self._valid_until = started + lease
                else:
                    self._stop_taken_over_run(job_id, attempt)

    @staticmethod
    def _stop_lapsed_run(job_id: str, attempt: int, unreachable: float) -> None:
        """The lease lapsed unrenewed (the database unreachable): stop the run before another starts."""
        log.warning("job %s: attempt %d stops itself: its lease lapsed after %.1f s without the database; "
                    "the sweeper gives the job to another run", job_id, attempt, unreachable)
        if not stop_run(LeaseLapsed):
            log.warning("job %s: attempt %d cannot be stopped here (not a pool child)", job_id, attempt)

    @staticmethod
    def _stop_taken_over_run(job_id: str, attempt: int) -> None:
        """The job is no longer this run's: stop the run (TakenOver raised in the job)."""
        if not stop_run(TakenOver):  # not a pool child: nobody to stop
            log.warning("job %s: attempt %d was taken over; nothing here can stop it", job_id, attempt)


_lease = _Lease()


def _stored(what: str, write: Callable[[], T]) -> T:
    """Run a ledger write, waiting out a database outage; a shutdown (HandBack) ends the wait.

    Any other error raises at once: a bug must not loop.
    """
    delay, since = STORE_RETRY_FIRST_SECONDS, None
    while True:
        try:
            result = write()
        except Exception as exc:
            kind = outages.database_outage(exc)
            if kind is None:
                raise
            if since is None:
                since = time.monotonic()
                log.warning("cannot %s: database %s (%s); retrying until it answers", what, kind,
                            type(exc).__name__)
        else:
            if since is not None:
                log.warning("%s: done after waiting %.1f s for the database", what, time.monotonic() - since)
            return result
        with interruptible():
            time.sleep(delay)
        delay = min(delay * 2, STORE_RETRY_MAX_SECONDS)


def _record(job_id: str, attempt: int, started_at: datetime, what: str, write: Callable[[], bool]) -> bool:
    """Store the run's outcome (result or error), however long the database is away; False if dropped."""
    try:
        stored = _stored(f"store the {what} of job {job_id}", write)
    except HandBack:
        log.warning("job %s: attempt %d ended but its %s is not stored (database unreachable at "
                    "shutdown); %s", job_id, attempt, what, _recorded(job_id, attempt, started_at))
        raise Reject("outcome not stored before the shutdown", requeue=True) from None
    except TakenOver:
        stored = False
    if not stored:
        log.warning("job %s: attempt %d is no longer the job's run (taken over); its %s is dropped",
                    job_id, attempt, what)
    return stored


def _recorded(job_id: str, attempt: int, started_at: datetime) -> tuple[str, bool]:
    """Record a hand-back the ledger could not take (jobs/handbacks.py): what happens next, for the
    log, and whether a new message carries it (then the original must not be requeued)."""
    try:
        path = handbacks.record(job_id, attempt, started_at)
        where = f"recorded in {path}: handed back when its message comes here again"
    except OSError as exc:
        path, where = None, f"not recorded ({exc}): the sweeper takes it back once its lease lapses"
    try:
        outbox.publish(job_id, handed_back=handbacks.carried(attempt, started_at))
    except Exception as exc:  # noqa: BLE001 - any failure to publish leaves the requeue
        return f"{where} (no new message: {type(exc).__name__}: {exc})", False
    if path is not None:
        with contextlib.suppress(OSError):  # a stale record is fenced on its run: harmless
            handbacks.forget(job_id, attempt)
    return "sent again in a new message that carries the hand-back, for the next worker on any host", True


def _hand_back(job_id: str, attempt: int, started_at: datetime) -> None:
    """A shutdown interrupted the run: queue the job again, and say what really happened.

    The write must end before the MainProcess's SIGKILL (HANDBACK_SECONDS after
    its signal): a frozen database fails it in time (core/db.py deadline), the
    child returns, and its connection is closed with a Terminate.
    """
    try:
        with db.deadline(HAND_BACK_DB_SECONDS):
            handed = ledger.hand_back(job_id, attempt)
    except Exception as exc:
        if outages.database_outage(exc) is None:
            raise
        what, sent = _recorded(job_id, attempt, started_at)
        log.warning("job %s: attempt %d interrupted by shutdown; the database did not take the hand-back "
                    "(%s); %s", job_id, attempt, type(exc).__name__, what)
        if sent:
            raise Reject(HANDED_BACK, requeue=False) from None  # the new message is the job's now
        raise Reject("interrupted by shutdown", requeue=True) from None
    if handed:
        log.warning("job %s handed back to the queue (attempt %d interrupted by shutdown)", job_id, attempt)
        raise Reject(HANDED_BACK, requeue=True)  # stopright's own reason: its log filter knows it
    try:
        job = ledger.get(job_id) or {}
    except Exception:  # noqa: BLE001 - only for the log line
        job = {}
    log.warning("job %s: attempt %d interrupted by shutdown; not handed back: the ledger shows it %s "
                "(attempt %s), no longer this run's", job_id, attempt, job.get("status"), job.get("attempts"))
    raise Reject("interrupted by shutdown; the job is no longer this run's", requeue=False)


# Cut only where it says (interruptible()); a lost broker connection does not hand it back: the
# ledger claim fences a second delivery (a full disk's MISCONF is a "lost connection" too).
@celery_app.task(name=TASK_NAME, interrupt_anywhere=False, hand_back_on_connection_loss=False)
def run_job(job_id: str, handed_back: dict[str, Any] | None = None) -> None:
    """Run the job ``job_id`` names; ``handed_back``: the run a stop handed back, if the ledger missed it."""
    settings = get_settings()
    try:
        job = _stored(f"claim job {job_id}", lambda: ledger.claim(
            job_id, lease=settings.job_lease_seconds, max_attempts=settings.job_max_attempts))
    except HandBack:
        log.warning("job %s not started: the database is unreachable and the worker is stopping; "
                    "its message goes back to the queue", job_id)
        raise Reject("not claimed before the shutdown", requeue=True) from None
    if job is None and _stored(f"replay the hand-back of job {job_id}",
                               lambda: handbacks.replay(job_id, handed_back)):
        job = _stored(f"claim job {job_id}", lambda: ledger.claim(
            job_id, lease=settings.job_lease_seconds, max_attempts=settings.job_max_attempts))
    if job is None:
        log.info("job %s is finished or running elsewhere; message dropped", job_id)
        return
    attempt, started_at = job["attempts"], job["started_at"]
    log.info("job %s: attempt %d started", job_id, attempt)
    with _lease.held(job_id, attempt, settings.job_lease_seconds, job["lease_until"]):
        try:
            model, run = KINDS[job["task"]]  # a kind removed since the job was stored: failed
            with interruptible():
                result = run(model.model_validate(job["args"]))
        except HandBack:
            _hand_back(job_id, attempt, started_at)
        except LeaseLapsed:
            return  # logged by the lease keeper; the sweeper gives the job to the next run
        except TakenOver:
            log.warning("job %s: attempt %d stopped: the sweeper took the job back after its lease "
                        "lapsed; the row is left to the next run", job_id, attempt)
            return
        except Exception as exc:
            log.exception("job %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}"
            _record(job_id, attempt, started_at, "error", lambda: ledger.fail(job_id, attempt, error))
            return
        if _record(job_id, attempt, started_at, "result", lambda: ledger.succeed(job_id, attempt, result)):
            log.info("job %s: attempt %d succeeded", job_id, attempt)

