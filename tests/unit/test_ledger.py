"""The job ledger (jobs/ledger.py) against a SQLite file in tmp_path: rows, claims, schema, after the stop.

The fencing token (succeed / fail / renew / hand_back): test_ledger_fencing.py; the sweep and
the outbox marks: test_ledger_sweep.py. Helpers: tests/unit/ledger_helpers.py.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from core.db import get_engine
from jobs import ledger
from jobs.ledger import FAILED, QUEUED, RUNNING
from stopright import registry as shutdown_registry
from tests.unit.ledger_helpers import LEASE, MAX, claimed, new_job, set_row, take_back

pytestmark = pytest.mark.usefixtures("schema")


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
    shutdown_registry.current().close_all()

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
    shutdown_registry.current().close_all()
    assert not _open_files_under(var_dir)  # the stop closed the pool

    assert ledger.get(job_id)["id"] == job_id  # a late read still works
    assert not _open_files_under(var_dir), _open_files_under(var_dir)
