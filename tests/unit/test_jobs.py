"""The job runner (tasks/jobs.py) against a real SQLite ledger, without a broker."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from celery.exceptions import Reject

from core import db
from jobs import ledger
from jobs.kinds import KINDS, EchoArgs
from stopright import handback
from tasks import jobs
from tests.unit.ledger_helpers import flaky, unreachable


def run(job_id: str) -> None:
    jobs.run_job(job_id)  # the task, as a pool child runs it (stopright.HandBackTask.__call__), here


def test_a_job_runs_and_records_its_result(schema) -> None:
    job = ledger.create("echo", {"value": {"a": [1, 2]}})
    run(job["id"])
    done = ledger.get(job["id"])
    assert (done["status"], done["attempts"], done["result"]) == ("succeeded", 1, {"a": [1, 2]})
    assert done["started_at"] is not None and done["finished_at"] is not None


def test_a_finished_job_is_not_run_again(schema, monkeypatch) -> None:
    job = ledger.create("echo", {"value": 1})
    run(job["id"])
    calls = []
    monkeypatch.setitem(KINDS, "echo", (EchoArgs, lambda args: calls.append(args)))
    run(job["id"])  # a duplicate message
    assert calls == []
    assert ledger.get(job["id"])["attempts"] == 1


def test_a_job_that_raises_is_failed_with_the_error(schema, monkeypatch) -> None:
    def boom(args: EchoArgs) -> None:
        raise ValueError("no good")

    monkeypatch.setitem(KINDS, "echo", (EchoArgs, boom))
    job = ledger.create("echo", {"value": 1})
    run(job["id"])
    failed = ledger.get(job["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: no good"


def test_a_job_of_a_kind_that_no_longer_exists_is_failed(schema) -> None:
    job = ledger.create("vanished", {})
    run(job["id"])
    assert ledger.get(job["id"])["status"] == "failed"


def test_sigusr2_hands_a_running_job_back(schema, monkeypatch) -> None:
    # What the worker MainProcess does at the end of the grace: SIGUSR2 to the pool child.
    def long_job(args: EchoArgs) -> None:
        os.kill(os.getpid(), signal.SIGUSR2)
        raise AssertionError("the job was not interrupted")

    monkeypatch.setitem(KINDS, "echo", (EchoArgs, long_job))
    previous = signal.signal(signal.SIGUSR2, handback.interrupt)
    try:
        job = ledger.create("echo", {"value": 1})
        with pytest.raises(Reject) as rejected:
            run(job["id"])
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert rejected.value.requeue is True
    back = ledger.get(job["id"])
    assert (back["status"], back["attempts"], back["started_at"]) == ("queued", 0, None)


def test_sigusr2_between_jobs_does_nothing(schema) -> None:
    previous = signal.signal(signal.SIGUSR2, handback.interrupt)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)  # no job running: no HandBack raised here
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _lease_until(job_id: str):
    return ledger.get(job_id)["lease_until"]


def _wait_past(job_id: str, before, timeout: float = 5.0):
    """Poll until the stored lease moves past ``before``; the new value (or None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _lease_until(job_id)
        if now is not None and now > before:
            return now
        time.sleep(0.02)
    return None


def test_the_lease_is_renewed_while_the_job_runs_and_not_after(schema) -> None:
    period = 0.3  # renewed every period / 3
    job_id = ledger.create("echo", {"value": 1})["id"]
    attempt = ledger.claim(job_id, lease=period, max_attempts=5)["attempts"]
    lease = jobs._Lease()
    start = _lease_until(job_id)
    with lease.held(job_id, attempt, period, _lease_until(job_id)):
        first = _wait_past(job_id, start)
        assert first is not None, "not renewed while running"
        assert _wait_past(job_id, first) is not None, "renewed only once"
    after = _lease_until(job_id)
    time.sleep(4 * period / 3)  # four renewal periods: long enough to see a stray renewal
    assert _lease_until(job_id) == after


def test_a_job_taken_away_is_no_longer_renewed_and_the_next_one_is(schema, monkeypatch) -> None:
    """Once a renewal says the run is no longer the job's, the keeper stops trying for that run.

    The ledger's fence would refuse every later renewal anyway (the row stays
    ``queued`` either way), so the point is the number of tries: one.
    """
    period = 0.3
    tick = period / ledger.RENEWALS_PER_LEASE
    real_renew, tries = ledger.renew, []

    def counted_renew(job_id, attempt, **kwargs):
        renewed = real_renew(job_id, attempt, **kwargs)
        tries.append((job_id, renewed))
        return renewed

    monkeypatch.setattr(ledger, "renew", counted_renew)
    lease = jobs._Lease()
    lost = ledger.create("echo", {"value": 1})["id"]
    attempt = ledger.claim(lost, lease=period, max_attempts=5)["attempts"]
    with lease.held(lost, attempt, period, _lease_until(lost)):
        assert ledger.hand_back(lost, attempt)  # e.g. swept as stranded: the fence no longer matches
        deadline = time.monotonic() + 5
        while (lost, False) not in tries and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(4 * tick)  # four more renewal periods: a keeper that kept trying tries again here
    assert tries.count((lost, False)) == 1, tries
    assert (lost, True) not in tries
    kept = ledger.create("echo", {"value": 2})["id"]
    attempt = ledger.claim(kept, lease=period, max_attempts=5)["attempts"]
    start = _lease_until(kept)
    with lease.held(kept, attempt, period, _lease_until(kept)):
        assert _wait_past(kept, start) is not None, "the lease thread died"
    assert ledger.get(lost)["status"] == "queued"


# -- the lease keeper and the run under faults (issue 7) -------------------------------------------


def test_a_renewal_that_raises_does_not_stop_later_renewals(schema, monkeypatch) -> None:
    period = 1.0  # renewed every period / 3; a failed renewal is retried sooner
    job_id = ledger.create("echo", {"value": 1})["id"]
    attempt = ledger.claim(job_id, lease=period, max_attempts=5)["attempts"]
    real_renew, failures = ledger.renew, []

    def flaky_renew(*args, **kwargs):
        if len(failures) < 2:  # the database is away for the first two renewals
            failures.append(1)
            raise unreachable()
        return real_renew(*args, **kwargs)

    monkeypatch.setattr(ledger, "renew", flaky_renew)
    lease = jobs._Lease()
    start = _lease_until(job_id)
    with lease.held(job_id, attempt, period, _lease_until(job_id)):
        assert _wait_past(job_id, start, timeout=10) is not None, "the lease keeper died"
    assert len(failures) == 2


def test_a_run_whose_lease_was_taken_over_stops_and_leaves_the_row_alone(schema, monkeypatch) -> None:
    import threading

    monkeypatch.setenv("JOB_LEASE_SECONDS", "1")
    from core.config import get_settings

    get_settings.cache_clear()
    started, completed = threading.Event(), []

    def long_job(args: EchoArgs) -> None:
        started.set()
        time.sleep(10)
        completed.append(True)

    monkeypatch.setitem(KINDS, "echo", (EchoArgs, long_job))
    job_id = ledger.create("echo", {"value": 1})["id"]

    def take_over() -> None:  # what the sweeper does once it is sure the first run is gone
        assert started.wait(5)
        with db.get_engine().begin() as conn:
            conn.execute(ledger.jobs.update().where(ledger.jobs.c.id == job_id)
                         .values(attempts=ledger.jobs.c.attempts + 1))

    previous = signal.signal(signal.SIGUSR2, handback.interrupt)
    thief = threading.Thread(target=take_over)
    thief.start()
    try:
        run(job_id)
    finally:
        thief.join()
        signal.signal(signal.SIGUSR2, previous)
    assert completed == []  # stopped, not run to its end beside the new run
    job = ledger.get(job_id)
    assert (job["status"], job["attempts"], job["result"]) == ("running", 2, None)


def test_a_run_cut_off_from_the_database_stops_itself_before_the_sweeper_may_take_the_job(
        schema, monkeypatch, caplog) -> None:
    """No renewal gets through (this host cut off): the run stops within its lease's confirmation window.

    The sweeper gives the job to another run no sooner than one renewal period
    after the lease lapsed (jobs/ledger.py): the run must be gone by then.
    """
    monkeypatch.setenv("JOB_LEASE_SECONDS", "3")
    from core.config import get_settings

    get_settings.cache_clear()
    stopped_at, completed = [], []

    def long_job(args: EchoArgs) -> None:
        try:
            time.sleep(30)
        except BaseException:
            stopped_at.append(ledger.utcnow())
            raise
        completed.append(True)

    monkeypatch.setitem(KINDS, "echo", (EchoArgs, long_job))
    job_id = ledger.create("echo", {"value": 1})["id"]
    flaky(monkeypatch, "renew", failures=10**6)  # the database never answers a renewal
    previous = signal.signal(signal.SIGUSR2, handback.interrupt)
    try:
        run(job_id)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    job = ledger.get(job_id)
    assert completed == [] and len(stopped_at) == 1
    assert (job["status"], job["attempts"], job["result"]) == ("running", 1, None)  # left to the sweeper
    confirm = get_settings().job_lease_seconds / ledger.RENEWALS_PER_LEASE
    assert stopped_at[0] < job["lease_until"] + timedelta(seconds=confirm), (stopped_at, job["lease_until"])
    assert "stops itself: its lease lapsed" in caplog.text


def test_a_shutdown_of_a_run_no_longer_in_the_ledger_is_not_logged_as_handed_back(schema, monkeypatch,
                                                                                   caplog) -> None:
    def long_job(args: EchoArgs) -> None:
        job = ledger.get(job_id)
        ledger.fail(job_id, job["attempts"], "failed meanwhile")  # e.g. by a parallel run
        os.kill(os.getpid(), signal.SIGUSR2)
        raise AssertionError("the job was not interrupted")

    monkeypatch.setitem(KINDS, "echo", (EchoArgs, long_job))
    job_id = ledger.create("echo", {"value": 1})["id"]
    previous = signal.signal(signal.SIGUSR2, handback.interrupt)
    try:
        with pytest.raises(Reject):
            run(job_id)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert ledger.get(job_id)["status"] == "failed"
    assert "handed back to the queue" not in caplog.text
    assert f"job {job_id}" in caplog.text and "not handed back" in caplog.text


@pytest.mark.parametrize("write", ["claim", "succeed"])
def test_a_ledger_write_waits_for_the_database_instead_of_failing_the_job(schema, monkeypatch, write) -> None:
    job_id = ledger.create("echo", {"value": "kept"})["id"]
    calls = flaky(monkeypatch, write, failures=3)

    run(job_id)

    assert len(calls) == 4
    job = ledger.get(job_id)
    assert (job["status"], job["attempts"], job["result"]) == ("succeeded", 1, "kept")


def test_the_error_of_a_failed_job_waits_for_the_database_too(schema, monkeypatch) -> None:
    def boom(args: EchoArgs) -> None:
        raise ValueError("its own error")

    monkeypatch.setitem(KINDS, "echo", (EchoArgs, boom))
    job_id = ledger.create("echo", {"value": 1})["id"]
    flaky(monkeypatch, "fail", failures=2)

    run(job_id)

    job = ledger.get(job_id)
    assert (job["status"], job["error"]) == ("failed", "ValueError: its own error")


def test_a_bug_in_a_ledger_write_is_not_retried(schema, monkeypatch) -> None:
    job_id = ledger.create("echo", {"value": 1})["id"]
    calls = flaky(monkeypatch, "succeed", failures=99, error=TypeError("a bug"))

    with pytest.raises(TypeError):
        run(job_id)
    assert len(calls) == 1


def test_a_shutdown_ends_the_wait_for_the_database_and_keeps_the_message(schema, monkeypatch) -> None:
    import threading

    job_id = ledger.create("echo", {"value": 1})["id"]
    calls = flaky(monkeypatch, "succeed", failures=10**6)  # the database never comes back
    previous = signal.signal(signal.SIGUSR2, handback.interrupt)

    def stop_when_waiting() -> None:  # the worker's grace is used up: SIGUSR2
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)

    stopper = threading.Thread(target=stop_when_waiting)
    stopper.start()
    try:
        with pytest.raises(Reject) as rejected:
            run(job_id)
    finally:
        stopper.join()
        signal.signal(signal.SIGUSR2, previous)
    assert rejected.value.requeue is True
    assert ledger.get(job_id)["status"] == "running"  # the sweeper takes it back once its lease lapses
