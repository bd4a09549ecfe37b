"""Beat's sweep (jobs/sweeper.py) and the outbox relay (jobs/outbox.py), without a broker."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from core import db
from jobs import ledger, outbox, sweeper
from jobs.ledger import QUEUED, RUNNING

pytestmark = pytest.mark.usefixtures("schema")


def set_row(job_id: str, **values) -> None:
    with db.get_engine().begin() as conn:
        conn.execute(ledger.jobs.update().where(ledger.jobs.c.id == job_id).values(**values))


@pytest.fixture
def settings(monkeypatch):
    """JOB_LEASE_SECONDS=3 (a renewal period of 1 s), JOB_QUEUED_LEASE_SECONDS=60."""
    from core.config import get_settings

    monkeypatch.setenv("JOB_LEASE_SECONDS", "3")
    monkeypatch.setenv("JOB_QUEUED_LEASE_SECONDS", "60")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def test_the_sweep_republishes_a_job_whose_message_was_lost(publish, settings) -> None:
    job_id = ledger.create("echo", {"value": 1})["id"]
    set_row(job_id, queued_at=ledger.utcnow() - timedelta(minutes=5))

    assert sweeper.sweep_once() == 1

    assert publish.published_args == [[job_id]]


def test_the_sweep_publishes_a_job_stored_while_the_broker_was_down_at_once(publish, settings) -> None:
    job_id = ledger.create("echo", {"value": 1}, unpublished=True)["id"]  # queued a moment ago

    assert sweeper.sweep_once() == 1

    assert publish.published_args == [[job_id]]
    assert ledger.get(job_id)["unpublished_since"] is None
    assert sweeper.sweep_once() == 0  # published: not again


def test_the_sweep_takes_a_dead_run_back_only_on_a_second_sighting(publish, settings) -> None:
    job_id = ledger.create("echo", {"value": 1})["id"]
    ledger.claim(job_id, lease=3, max_attempts=5)
    set_row(job_id, lease_until=ledger.utcnow() - timedelta(seconds=1))  # its worker died

    assert sweeper.sweep_once() == 0  # first sighting: marked only
    assert ledger.get(job_id)["status"] == RUNNING
    set_row(job_id, lapsed_at=ledger.utcnow() - timedelta(seconds=1))  # one renewal period later
    assert sweeper.sweep_once() == 1

    job = ledger.get(job_id)
    assert (job["status"], job["attempts"], job["lapsed_at"]) == (QUEUED, 1, None)
    assert publish.published_args == [[job_id]]


def test_a_broker_down_during_the_sweep_keeps_the_jobs_for_the_next_one(publish, settings) -> None:
    job_id = ledger.create("echo", {"value": 1})["id"]
    set_row(job_id, queued_at=ledger.utcnow() - timedelta(minutes=5))
    publish.raises = ConnectionError("broker down")

    assert sweeper.sweep_once() == 0

    assert ledger.get(job_id)["unpublished_since"] is not None
    publish.raises = None
    assert sweeper.sweep_once() == 1  # not after another queued lease: at the next sweep


def test_the_sweeper_thread_survives_an_unreachable_database(publish, settings, monkeypatch, caplog) -> None:
    from tests.unit.ledger_helpers import unreachable

    calls = []

    def flaky(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise unreachable()
        return []

    monkeypatch.setattr(ledger, "sweep_stranded", flaky)
    from stopright import registry as shutdown_registry

    thread = sweeper.Sweeper()
    thread.start(shutdown_registry.current())
    try:
        for expected in (1, 2):
            thread.wake()
            deadline = time.monotonic() + 5
            while len(calls) < expected and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(calls) == 2, "the sweeper thread died"
        assert "sweep skipped: database unreachable" in caplog.text
    finally:
        thread.stop()
    assert not thread._thread.is_alive()


def test_the_relay_publishes_the_jobs_once_the_broker_answers(publish) -> None:
    publish.raises = ConnectionError("broker down")
    first = ledger.create("echo", {"value": 1})["id"]
    outbox.send(first, marked=False)  # the inline publish fails: the relay holds it
    assert outbox.broker_known_down()
    second = ledger.create("echo", {"value": 2}, unpublished=True)["id"]
    outbox.send(second, marked=True)  # not tried inline while the broker is known down
    assert publish.published_args == [[first]]

    publish.raises = None
    deadline = time.monotonic() + 10
    while outbox.broker_known_down() and time.monotonic() < deadline:
        time.sleep(0.02)

    assert not outbox.broker_known_down()
    assert publish.published_args[-2:] == [[first], [second]]  # in the order they were accepted
    assert [ledger.get(i)["unpublished_since"] for i in (first, second)] == [None, None]


def test_the_relay_stops_with_its_process_and_leaves_the_marks(publish) -> None:
    from stopright import registry as shutdown_registry

    publish.raises = ConnectionError("broker down")
    job_id = ledger.create("echo", {"value": 1})["id"]
    outbox.send(job_id, marked=False)

    shutdown_registry.current().close_all()  # the web worker's stop

    assert not outbox._relay._thread.is_alive()
    assert ledger.get(job_id)["unpublished_since"] is not None  # for beat's sweeper


# -- beat's side ----------------------------------------------------------------------------------


def test_beat_hands_the_sweep_entry_to_its_sweeper_thread_and_sends_nothing(caplog) -> None:
    import logging
    from types import SimpleNamespace

    from tasks.beat import Scheduler

    woken = []
    scheduler = object.__new__(Scheduler)  # no store, no broker: only the routing is under test
    scheduler.sweeper = SimpleNamespace(wake=lambda: woken.append(True))
    entry = SimpleNamespace(name="requeue-stranded-jobs", task=sweeper.TASK_NAME)

    with caplog.at_level(logging.INFO):
        scheduler.apply_entry(entry, producer=scheduler.producer)

    assert woken == [True]
    assert scheduler.producer is None  # beat opens no broker connection of its own
    assert "Sending due task requeue-stranded-jobs" in caplog.text


def test_a_schedule_store_that_cannot_be_written_does_not_stop_beat(caplog) -> None:
    import errno

    from tasks.beat import Scheduler

    class FullDisk:
        def sync(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    scheduler = object.__new__(Scheduler)
    scheduler._store = FullDisk()

    scheduler.sync()  # beat's loop goes on

    assert "schedule store not saved" in caplog.text
