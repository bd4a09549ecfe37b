"""The job ledger (app/ledger.py) against a SQLite file in tmp_path."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app import ledger, shutdown
from app.db import get_engine
from app.ledger import FAILED, QUEUED, RUNNING, SUCCEEDED

pytestmark = pytest.mark.usefixtures("schema")

LEASE = 30.0
MAX = 5


def new_job(task: str = "sleep", args: dict | None = None) -> str:
    return ledger.create(task, {"seconds": 1.0} if args is None else args)["id"]


def set_row(job_id: str, **values) -> None:
    with get_engine().begin() as conn:
        conn.execute(update(ledger.jobs).where(ledger.jobs.c.id == job_id).values(**values))


def claimed(job_id: str, *, lease: float = LEASE, max_attempts: int = MAX) -> dict:
    job = ledger.claim(job_id, lease=lease, max_attempts=max_attempts)
    assert job is not None
    return job


def expire_lease(job_id: str) -> None:
    set_row(job_id, lease_until=ledger.utcnow() - timedelta(seconds=1))


# -- create / get / schema ------------------------------------------------------------


def test_create_stores_a_queued_job_with_no_attempts():
    job = ledger.create("echo", {"value": [1, {"a": None}]})

    assert ledger.get(job["id"]) == job
    assert job["status"] == QUEUED
    assert job["attempts"] == 0
    assert job["args"] == {"value": [1, {"a": None}]}
    assert job["created_at"] == job["queued_at"]
    assert job["started_at"] is None and job["finished_at"] is None and job["lease_until"] is None


def test_get_unknown_is_none():
    assert ledger.get("nope") is None


def test_ensure_schema_twice_is_harmless():
    job_id = new_job()

    ledger.ensure_schema()

    assert ledger.get(job_id) is not None


def test_the_database_is_a_sqlite_file_in_var_dir(var_dir):
    new_job()

    assert (var_dir / "app.db").is_file()


def test_public_has_the_api_fields_and_iso_utc_times():
    job = claimed(new_job())

    view = ledger.public(job)

    assert tuple(view) == ledger.PUBLIC_FIELDS
    assert "lease_until" not in view and "queued_at" not in view
    assert view["created_at"].endswith("Z") and len(view["created_at"]) == len("2024-01-01T00:00:00.000Z")
    assert view["started_at"] == job["started_at"].isoformat(timespec="milliseconds") + "Z"
    assert view["finished_at"] is None


# -- claim ----------------------------------------------------------------------------------


def test_claim_of_a_queued_job_starts_attempt_one_with_a_lease():
    job_id = new_job()
    before = ledger.utcnow()

    job = claimed(job_id, lease=LEASE)

    assert job["status"] == RUNNING
    assert job["attempts"] == 1
    assert job["started_at"] >= before
    assert job["lease_until"] == job["started_at"] + timedelta(seconds=LEASE)
    assert ledger.get(job_id) == job


def test_a_second_claim_while_the_lease_holds_returns_none():
    job_id = new_job()
    first = claimed(job_id)

    assert ledger.claim(job_id, lease=LEASE, max_attempts=MAX) is None
    assert ledger.get(job_id) == first


def test_claim_after_the_lease_expired_starts_the_next_attempt():
    job_id = new_job()
    claimed(job_id, lease=-1.0)  # a lease already in the past: the worker "died"

    second = claimed(job_id)

    assert second["status"] == RUNNING
    assert second["attempts"] == 2


@pytest.mark.parametrize("finish", ["succeed", "fail"])
def test_claim_of_a_finished_job_returns_none_and_changes_nothing(finish):
    job_id = new_job()
    attempt = claimed(job_id)["attempts"]
    if finish == "succeed":
        ledger.succeed(job_id, attempt, {"ok": True})
    else:
        ledger.fail(job_id, attempt, "boom")
    finished = ledger.get(job_id)

    assert ledger.claim(job_id, lease=LEASE, max_attempts=MAX) is None
    assert ledger.get(job_id) == finished


def test_claim_of_an_unknown_job_returns_none():
    assert ledger.claim("nope", lease=LEASE, max_attempts=MAX) is None


def test_claim_of_a_job_out_of_attempts_marks_it_failed():
    job_id = new_job()
    set_row(job_id, attempts=3)

    assert ledger.claim(job_id, lease=LEASE, max_attempts=3) is None

    job = ledger.get(job_id)
    assert job["status"] == FAILED
    assert job["attempts"] == 3
    assert job["error"] == "gave up after 3 attempts (each ended without finishing)"
    assert job["finished_at"] is not None
    assert job["lease_until"] is None


def test_max_attempts_counts_starts_that_never_finished():
    job_id = new_job()
    for attempt in (1, 2):
        assert claimed(job_id, lease=-1.0, max_attempts=2)["attempts"] == attempt  # each run "dies"

    assert ledger.claim(job_id, lease=LEASE, max_attempts=2) is None
    assert ledger.get(job_id)["status"] == FAILED


def test_a_stranded_job_swept_back_to_queued_still_counts_its_attempt():
    job_id = new_job()
    claimed(job_id, lease=-1.0, max_attempts=1)
    assert ledger.sweep_stranded(queued_lease=60) == [job_id]
    assert ledger.get(job_id)["attempts"] == 1

    assert ledger.claim(job_id, lease=LEASE, max_attempts=1) is None
    assert ledger.get(job_id)["status"] == FAILED


def test_a_running_job_with_a_live_lease_is_not_failed_for_attempts():
    job_id = new_job()
    claimed(job_id, max_attempts=1)

    assert ledger.claim(job_id, lease=LEASE, max_attempts=1) is None
    assert ledger.get(job_id)["status"] == RUNNING


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
    assert ledger.sweep_stranded(queued_lease=60) == []


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


# -- sweep_stranded ---------------------------------------------------------------------------------


def test_sweep_requeues_a_running_job_whose_lease_expired():
    job_id = new_job()
    claimed(job_id, lease=-1.0)
    before = ledger.utcnow()

    assert ledger.sweep_stranded(queued_lease=60) == [job_id]

    job = ledger.get(job_id)
    assert job["status"] == QUEUED
    assert job["lease_until"] is None
    assert job["queued_at"] >= before
    assert job["attempts"] == 1


def test_sweep_requeues_a_job_queued_longer_than_queued_lease():
    job_id = new_job()
    old = ledger.utcnow() - timedelta(seconds=120)
    set_row(job_id, queued_at=old)

    assert ledger.sweep_stranded(queued_lease=60) == [job_id]

    job = ledger.get(job_id)
    assert job["status"] == QUEUED
    assert job["queued_at"] > old


def test_sweep_leaves_fresh_jobs_alone():
    queued = new_job()
    running = new_job()
    claimed(running)
    snapshot = {i: ledger.get(i) for i in (queued, running)}

    assert ledger.sweep_stranded(queued_lease=60) == []
    assert {i: ledger.get(i) for i in (queued, running)} == snapshot


def test_sweep_leaves_finished_jobs_alone_however_old():
    done = new_job()
    ledger.succeed(done, claimed(done)["attempts"], None)
    failed = new_job()
    ledger.fail(failed, claimed(failed)["attempts"], "boom")
    long_ago = ledger.utcnow() - timedelta(days=1)
    for job_id in (done, failed):
        set_row(job_id, queued_at=long_ago, lease_until=long_ago)

    assert ledger.sweep_stranded(queued_lease=60) == []


def test_sweep_returns_only_the_stranded_ones_among_many():
    fresh_queued = new_job()
    fresh_running = new_job()
    claimed(fresh_running)
    dead_running = new_job()
    claimed(dead_running, lease=-1.0)
    lost_queued = new_job()
    set_row(lost_queued, queued_at=ledger.utcnow() - timedelta(minutes=5))

    swept = ledger.sweep_stranded(queued_lease=60)

    assert sorted(swept) == sorted([dead_running, lost_queued])
    assert ledger.get(fresh_queued)["status"] == QUEUED
    assert ledger.get(fresh_running)["status"] == RUNNING


def test_a_swept_job_is_not_swept_again_until_its_timer_runs_out_again():
    job_id = new_job()
    set_row(job_id, queued_at=ledger.utcnow() - timedelta(seconds=120))
    assert ledger.sweep_stranded(queued_lease=60) == [job_id]

    assert ledger.sweep_stranded(queued_lease=60) == []


def test_a_swept_running_job_can_be_claimed_again():
    job_id = new_job()
    claimed(job_id, lease=-1.0)
    ledger.sweep_stranded(queued_lease=60)

    again = claimed(job_id)

    assert again["status"] == RUNNING
    assert again["attempts"] == 2


# -- after the shutdown closed the engine ------------------------------------------------------------


def test_the_ledger_still_answers_after_the_registry_closed_the_database():
    job_id = new_job()
    shutdown.current().close_all()

    assert ledger.get(job_id)["id"] == job_id
