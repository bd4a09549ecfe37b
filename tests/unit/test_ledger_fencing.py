"""The ledger's fencing token (jobs/ledger.py): only the current attempt of a running job changes it.

A run that stalled past its lease and was taken back must not overwrite its successor.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobs import ledger
from jobs.ledger import FAILED, QUEUED, RUNNING, SUCCEEDED
from tests.unit.ledger_helpers import LEASE, MAX, claimed, expire_lease, new_job, sweep, take_back

pytestmark = pytest.mark.usefixtures("schema")


# -- the fencing token: succeed / fail / renew / hand_back -------------------------------------


def test_succeed_with_the_current_attempt_stores_the_result():
    job_id = new_job()
    attempt = claimed(job_id)["attempts"]

    assert ledger.succeed(job_id, attempt, {"slept": 1.0}) is True

    job = ledger.get(job_id)
    assert job["status"] == SUCCEEDED
    assert job["result"] == {"slept": 1.0}
    assert job["error"] is None
    assert job["finished_at"] is not None
    assert job["lease_until"] is None


@pytest.mark.parametrize("operation", ["succeed", "fail", "renew", "hand_back"])
def test_a_stale_attempt_is_fenced_off(operation):
    job_id = new_job()
    claimed(job_id, lease=-1.0)  # attempt 1 stalls past its lease ...
    take_back(job_id)
    current = claimed(job_id)  # ... and attempt 2 takes over
    assert current["attempts"] == 2

    stale = {"succeed": lambda: ledger.succeed(job_id, 1, "stale result"),
             "fail": lambda: ledger.fail(job_id, 1, "stale error"),
             "renew": lambda: ledger.renew(job_id, 1, lease=LEASE),
             "hand_back": lambda: ledger.hand_back(job_id, 1)}[operation]

    assert stale() is False
    assert ledger.get(job_id) == current


@pytest.mark.parametrize("attempt", [0, 2, 99])
def test_succeed_with_the_wrong_attempt_returns_false(attempt):
    job_id = new_job()
    running = claimed(job_id)

    assert ledger.succeed(job_id, attempt, "nope") is False
    assert ledger.get(job_id) == running


@pytest.mark.parametrize("operation", ["succeed", "fail", "renew", "hand_back"])
def test_nothing_changes_a_job_that_is_not_running(operation):
    job_id = new_job()
    attempt = claimed(job_id)["attempts"]
    assert ledger.succeed(job_id, attempt, "first")
    done = ledger.get(job_id)

    again = {"succeed": lambda: ledger.succeed(job_id, attempt, "second"),
             "fail": lambda: ledger.fail(job_id, attempt, "late"),
             "renew": lambda: ledger.renew(job_id, attempt, lease=LEASE),
             "hand_back": lambda: ledger.hand_back(job_id, attempt)}[operation]

    assert again() is False
    assert ledger.get(job_id) == done


def test_fail_records_the_error():
    job_id = new_job()
    attempt = claimed(job_id)["attempts"]

    assert ledger.fail(job_id, attempt, "ValueError: bad") is True

    job = ledger.get(job_id)
    assert job["status"] == FAILED
    assert job["error"] == "ValueError: bad"
    assert job["result"] is None
    assert job["finished_at"] is not None
    assert job["lease_until"] is None


def test_renew_moves_the_lease_forward():
    job_id = new_job()
    job = claimed(job_id, lease=1.0)

    assert ledger.renew(job_id, job["attempts"], lease=120.0) is True

    renewed = ledger.get(job_id)
    assert renewed["lease_until"] >= job["lease_until"] + timedelta(seconds=100)
    assert renewed["status"] == RUNNING and renewed["attempts"] == job["attempts"]


def test_renew_keeps_a_job_from_being_reclaimed():
    job_id = new_job()
    attempt = claimed(job_id)["attempts"]
    expire_lease(job_id)

    assert ledger.renew(job_id, attempt, lease=LEASE) is True

    assert ledger.claim(job_id, lease=LEASE, max_attempts=MAX) is None
    assert sweep() == [] and sweep() == []


def test_hand_back_requeues_the_job_without_counting_the_attempt():
    job_id = new_job()
    attempt = claimed(job_id)["attempts"]
    before = ledger.utcnow()

    assert ledger.hand_back(job_id, attempt) is True

    job = ledger.get(job_id)
    assert job["status"] == QUEUED
    assert job["attempts"] == 0
    assert job["started_at"] is None
    assert job["lease_until"] is None
    assert job["queued_at"] >= before


def test_a_handed_back_job_can_be_claimed_again_as_the_same_attempt_number():
    job_id = new_job()
    ledger.hand_back(job_id, claimed(job_id)["attempts"])

    again = claimed(job_id)

    assert again["attempts"] == 1


def test_hand_backs_never_exhaust_max_attempts():
    job_id = new_job()
    for _ in range(5):
        assert ledger.hand_back(job_id, claimed(job_id, max_attempts=1)["attempts"])

    assert claimed(job_id, max_attempts=1)["status"] == RUNNING
