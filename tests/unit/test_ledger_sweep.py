"""The ledger's sweep (jobs/ledger.py ``sweep_stranded``) and the outbox marks it reads.

A running job whose lease lapsed on two sweeps goes back to the queue; a queued one left
too long, or stored unpublished, is returned for publishing. (The sweeper process: test_sweeper.py.)
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobs import ledger
from jobs.ledger import QUEUED, RUNNING
from tests.unit.ledger_helpers import LEASE, claimed, new_job, set_row, sweep, take_back

pytestmark = pytest.mark.usefixtures("schema")


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


# -- the outbox marks -----------------------------------------------------------------------------


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
