"""The job ledger (jobs/ledger.py) against a SQLite file in tmp_path."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import shutdown
from core.db import get_engine
from jobs import ledger
from jobs.ledger import FAILED, QUEUED, RUNNING, SUCCEEDED

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


def sweep(*, queued_lease: float = 60, confirm_after: float = 0) -> list[str]:
    return ledger.sweep_stranded(queued_lease=queued_lease, confirm_after=confirm_after)


def take_back(job_id: str) -> None:
    """The sweeper takes a dead run's job back: its lease seen lapsed on two sweeps."""
    assert job_id not in sweep()
    assert job_id in sweep()


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


def test_a_running_job_is_not_claimed_even_past_its_lease():
    job_id = new_job()
    first = claimed(job_id, lease=-1.0)  # a lease in the past: its run died, or could not renew

    assert ledger.claim(job_id, lease=LEASE, max_attempts=MAX) is None
    assert ledger.get(job_id) == first  # only the sweeper takes it back


def test_claim_after_the_sweeper_took_a_dead_run_back_starts_the_next_attempt():
    job_id = new_job()
    claimed(job_id, lease=-1.0)
    take_back(job_id)

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
        take_back(job_id)

    assert ledger.claim(job_id, lease=LEASE, max_attempts=2) is None
    assert ledger.get(job_id)["status"] == FAILED


def test_a_stranded_job_swept_back_to_queued_still_counts_its_attempt():
    job_id = new_job()
    claimed(job_id, lease=-1.0, max_attempts=1)
    take_back(job_id)
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


# -- sweep_stranded ---------------------------------------------------------------------------------


def test_sweep_requeues_a_running_job_whose_lease_lapsed_on_two_sweeps():
    job_id = new_job()
    claimed(job_id, lease=-1.0)
    before = ledger.utcnow()

    assert sweep() == []  # first sighting: only marked
    marked = ledger.get(job_id)
    assert marked["status"] == RUNNING and marked["lapsed_at"] >= before
    assert sweep() == [job_id]

    job = ledger.get(job_id)
    assert job["status"] == QUEUED
    assert job["lease_until"] is None and job["lapsed_at"] is None
    assert job["queued_at"] >= before
    assert job["attempts"] == 1


def test_a_lapse_is_confirmed_only_a_renewal_period_after_it_was_first_seen():
    job_id = new_job()
    claimed(job_id, lease=-1.0)
    assert sweep(confirm_after=30) == []  # marked
    assert sweep(confirm_after=30) == []  # seen again too soon: a live keeper may not have retried yet

    set_row(job_id, lapsed_at=ledger.utcnow() - timedelta(seconds=31))
    assert sweep(confirm_after=30) == [job_id]


def test_a_renewal_between_two_sweeps_keeps_the_job_with_its_run():
    # The database was away longer than the lease: the live run renews once it is back.
    job_id = new_job()
    attempt = claimed(job_id, lease=-1.0)["attempts"]
    assert sweep() == []  # marked

    assert ledger.renew(job_id, attempt, lease=LEASE)
    assert ledger.get(job_id)["lapsed_at"] is None
    assert sweep() == [] and sweep() == []
    assert ledger.get(job_id)["status"] == RUNNING


def test_sweep_requeues_a_job_queued_longer_than_queued_lease():
    job_id = new_job()
    old = ledger.utcnow() - timedelta(seconds=120)
    set_row(job_id, queued_at=old)

    assert sweep() == [job_id]

    job = ledger.get(job_id)
    assert job["status"] == QUEUED
    assert job["queued_at"] > old


def test_sweep_leaves_fresh_jobs_alone():
    queued = new_job()
    running = new_job()
    claimed(running)
    snapshot = {i: ledger.get(i) for i in (queued, running)}

    assert sweep() == []
    assert {i: ledger.get(i) for i in (queued, running)} == snapshot


def test_sweep_leaves_finished_jobs_alone_however_old():
    done = new_job()
    ledger.succeed(done, claimed(done)["attempts"], None)
    failed = new_job()
    ledger.fail(failed, claimed(failed)["attempts"], "boom")
    long_ago = ledger.utcnow() - timedelta(days=1)
    for job_id in (done, failed):
        set_row(job_id, queued_at=long_ago, lease_until=long_ago)

    assert sweep() == []


def test_sweep_returns_only_the_stranded_ones_among_many():
    fresh_queued = new_job()
    fresh_running = new_job()
    claimed(fresh_running)
    dead_running = new_job()
    claimed(dead_running, lease=-1.0)
    lost_queued = new_job()
    set_row(lost_queued, queued_at=ledger.utcnow() - timedelta(minutes=5))

    assert sweep() == [lost_queued]  # the dead run is only marked on this first sighting
    set_row(lost_queued, queued_at=ledger.utcnow() - timedelta(minutes=5))
    swept = sweep()

    assert sorted(swept) == sorted([dead_running, lost_queued])
    assert ledger.get(fresh_queued)["status"] == QUEUED
    assert ledger.get(fresh_running)["status"] == RUNNING


def test_a_swept_job_is_not_swept_again_until_its_timer_runs_out_again():
    job_id = new_job()
    set_row(job_id, queued_at=ledger.utcnow() - timedelta(seconds=120))
    assert sweep() == [job_id]

    assert sweep() == []


def test_a_swept_running_job_can_be_claimed_again():
    job_id = new_job()
    claimed(job_id, lease=-1.0)
    take_back(job_id)

    again = claimed(job_id)

    assert again["status"] == RUNNING
    assert again["attempts"] == 2


def test_sweep_returns_jobs_stored_unpublished_until_they_are_marked_published():
    job_id = ledger.create("echo", {"value": 1}, unpublished=True)["id"]
    other = new_job()

    assert sweep() == [job_id]  # at once, not after the queued lease
    assert sweep() == [job_id]  # until it is out
    ledger.mark_published([job_id])
    assert sweep() == []
    ledger.mark_unpublished([other])  # its publish failed
    assert sweep() == [other]


def test_a_claim_clears_the_unpublished_mark():
    job_id = ledger.create("echo", {"value": 1}, unpublished=True)["id"]  # its message did go out

    assert claimed(job_id)["unpublished_since"] is None
    ledger.hand_back(job_id, 1)
    assert sweep() == []


# -- schema -----------------------------------------------------------------------------------------


def test_ensure_schema_adds_the_new_columns_to_an_existing_table(var_dir):
    from sqlalchemy import text

    engine = get_engine()
    with engine.begin() as conn:  # the table as the previous version created it
        conn.execute(text("DROP TABLE jobs"))
        conn.execute(text("CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, task VARCHAR(64) NOT NULL, "
                          "args JSON NOT NULL, status VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, "
                          "result JSON, error TEXT, created_at DATETIME NOT NULL, "
                          "queued_at DATETIME NOT NULL, started_at DATETIME, finished_at DATETIME, "
                          "lease_until DATETIME)"))
        conn.execute(text("INSERT INTO jobs (id, task, args, status, attempts, created_at, queued_at) "
                          "VALUES ('old', 'echo', '{\"value\": 1}', 'queued', 0, "
                          "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"))

    ledger.ensure_schema()
    ledger.ensure_schema()  # a second process racing: harmless

    old = ledger.get("old")
    assert (old["status"], old["lapsed_at"], old["unpublished_since"]) == (QUEUED, None, None)
    assert claimed("old")["attempts"] == 1


# -- after the shutdown closed the engine ------------------------------------------------------------


def test_the_ledger_still_answers_after_the_registry_closed_the_database():
    job_id = new_job()
    shutdown.current().close_all()

    assert ledger.get(job_id)["id"] == job_id


def _open_files_under(directory) -> list[str]:
    """This process's open file descriptors on files under ``directory`` (Linux /proc)."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, gone already
            continue
    return [p for p in paths if p.startswith(str(directory))]


def test_a_read_that_races_the_stop_closes_its_connection(var_dir) -> None:
    """The registry has closed the database; a request still in hand reads, and its connection is
    closed when it is done, not left for the exit to drop (PostgreSQL logs "unexpected EOF")."""
    job_id = ledger.create("echo", {"value": 1})["id"]
    assert _open_files_under(var_dir)  # the pooled connection: the check below can see one
    shutdown.current().close_all()
    assert not _open_files_under(var_dir)  # the stop closed the pool

    assert ledger.get(job_id)["id"] == job_id  # a late read still works
    assert not _open_files_under(var_dir), _open_files_under(var_dir)
