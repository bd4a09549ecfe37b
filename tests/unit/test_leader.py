"""Beat's leader lease (core/leader.py) on a real SQLite file: one holder, release, lapse, fencing, runs."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from celery.beat import ScheduleEntry, Scheduler
from sqlalchemy import exc

from core import leader
from core.celery_app import celery_app
from tasks.beat import SEND_WAIT_SECONDS, StopAfterSends, adopt
from tests.unit.shutdown_helpers import FakeClock

LEASE = 3.0


@pytest.fixture
def tables(var_dir) -> None:
    leader.ensure_schema()


def keeper(name: str, *, clock: FakeClock | None = None, lease_class: type = leader.Lease,
           **kwargs) -> leader.Leader:
    return leader.Leader(lease_class("beat", name, LEASE, **kwargs), clock=clock or FakeClock())


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "leader"]


def test_two_contending_leases_one_holds(tables, caplog) -> None:
    caplog.set_level(logging.INFO, logger="leader")
    a, b = keeper("host-a:1:aa"), keeper("host-b:2:bb")
    assert a.step() == pytest.approx(LEASE / leader.RENEWALS_PER_LEASE)
    assert b.step() == leader.POLL_SECONDS
    assert a.leading and not b.leading
    assert b.step() == leader.POLL_SECONDS and a.step() and a.leading and not b.leading  # renewed
    assert messages(caplog).count("standby: host-a:1:aa leads") == 1  # once, not at every look


def test_of_many_racing_for_a_missing_row_exactly_one_wins(tables) -> None:
    """The row does not exist yet: every contender INSERTs; the primary key lets one in."""
    leases = [leader.Lease("beat", f"host:{n}:x", LEASE) for n in range(8)]
    start = threading.Barrier(len(leases))
    won: dict[str, bool] = {}

    def take(lease: leader.Lease) -> None:
        start.wait()
        won[lease.holder] = lease.acquire()

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [holder for holder, took in won.items() if took]
    assert len(won) == 8 and len(winners) == 1, won
    assert leases[0].read().holder == winners[0]


def test_release_lets_the_other_take_it_at_once(tables, caplog) -> None:
    caplog.set_level(logging.INFO, logger="leader")
    a, b = keeper("host-a:1:aa"), keeper("host-b:2:bb")
    a.step()
    b.step()
    assert not b.leading
    a.lease.record("sweep", datetime(2030, 1, 1, 12, 0, 0))
    assert a.lease.release()
    assert not a.lease.release()  # only if ours
    b.step()
    assert b.leading and b.term == 1
    assert any(m.startswith("leading (took over after") and "from a released lease" in m
               for m in messages(caplog)), messages(caplog)
    assert b.recorded == {"sweep": datetime(2030, 1, 1, 12, 0, 0)}


def test_the_thread_releases_at_its_stop(tables) -> None:
    import stopright.registry

    a = leader.Leader(leader.Lease("beat", "host-a:1:aa", LEASE))
    a.start(stopright.registry.current())
    waited = threading.Event()
    for _ in range(200):  # the thread's first step takes it (bounded, not a proof)
        if a.leading:
            break
        waited.wait(0.05)
    assert a.leading
    a.record("sweep", datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC))
    a.stop()
    assert not a.leading
    row = a.lease.read()
    assert row is not None and row.holder is None
    assert a.lease.recorded() == {"sweep": datetime(2030, 1, 1, 12, 0, 0)}  # recorded before the release


def test_a_lapsed_lease_is_taken_over(tables) -> None:
    t0 = leader.utcnow()
    a = leader.Lease("beat", "host-a:1:aa", LEASE, now=lambda: t0)
    assert a.acquire()
    early = leader.Lease("beat", "host-b:2:bb", LEASE, now=lambda: t0 + timedelta(seconds=LEASE - 0.1))
    assert not early.acquire()
    late = leader.Lease("beat", "host-b:2:bb", LEASE, now=lambda: t0 + timedelta(seconds=LEASE + 0.1))
    assert late.acquire()
    assert a.read().holder == "host-b:2:bb"
    assert not a.acquire()  # the old holder cannot renew what is no longer its own


class Unreachable(leader.Lease):
    """A lease whose database stopped answering (what the outage rules call unreachable)."""

    down = False

    def acquire(self) -> bool:
        if self.down:
            raise exc.OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))
        return super().acquire()


def test_a_leader_that_cannot_renew_stops_leading_before_its_lease_lapses(tables, caplog) -> None:
    caplog.set_level(logging.INFO, logger="leader")
    clock = FakeClock()
    a = keeper("host-a:1:aa", clock=clock, lease_class=Unreachable)
    period = a.period
    a.step()
    assert a.leading
    a.lease.down = True
    clock.advance(period)
    a.step()  # fails: still leading, the fence is one period before the lease's end
    assert a.leading
    clock.advance(period - 0.01)
    assert a.leading
    clock.advance(0.01)
    assert not a.leading  # stopped: the lease itself still has a period to run
    b = keeper("host-b:2:bb")
    b.step()
    assert not b.leading  # the database still says host-a holds it: no overlap
    a.step()
    a.step()
    fenced = [m for m in messages(caplog) if m.startswith("not leading: the lease could not be renewed")]
    outages = [m for m in messages(caplog) if m.startswith("leader lease: database unreachable")]
    assert len(fenced) == 1 and len(outages) == 1, messages(caplog)
    a.lease.down = False
    a.step()  # the database is back and nobody took the lease: leading again, a new term
    assert a.leading and a.term == 2
    assert "leader lease: the database answers again" in messages(caplog)


def test_a_step_that_stalled_past_the_fence_starts_a_new_term(tables, caplog) -> None:
    """A leader whose thread stood still (a suspended host) may have been replaced meanwhile."""
    caplog.set_level(logging.INFO, logger="leader")
    clock = FakeClock()
    a = keeper("host-a:1:aa", clock=clock)
    a.step()
    b = leader.Leader(leader.Lease("beat", "host-b:2:bb", LEASE, now=lambda: leader.utcnow() + timedelta(
        seconds=LEASE)), clock=FakeClock())
    b.step()  # host-a's lease lapsed for host-b: it leads, records a run, stops
    assert b.leading
    b.lease.record("sweep", datetime(2030, 1, 1, 12, 0, 0))
    assert b.lease.release()
    clock.advance(LEASE)
    a.step()
    assert a.leading and a.term == 2 and a.recorded == {"sweep": datetime(2030, 1, 1, 12, 0, 0)}
    assert sum(m.startswith("not leading") for m in messages(caplog)) == 1, messages(caplog)


def test_recorded_runs_only_move_forward(tables) -> None:
    lease = leader.Lease("beat", "host-a:1:aa", LEASE)
    t = datetime(2030, 1, 1, 12, 0, 0)
    lease.record("sweep", t)
    lease.record("sweep", t - timedelta(seconds=5))  # a stale leader's late write
    lease.record("report", t - timedelta(seconds=1))
    lease.record("sweep", t + timedelta(seconds=1))
    other = leader.Lease("beat", "host-b:2:bb", LEASE)
    assert other.recorded() == {"sweep": t + timedelta(seconds=1), "report": t - timedelta(seconds=1)}
    assert leader.Lease("other", "host-b:2:bb", LEASE).recorded() == {}


def test_a_new_leader_starts_each_entry_from_the_later_of_its_own_and_the_recorded_run() -> None:
    recorded_at = datetime(2030, 1, 1, 12, 0, 0)

    def entry(name: str, last: datetime, runs: int) -> ScheduleEntry:
        return ScheduleEntry(name=name, task="t", schedule=timedelta(seconds=10), last_run_at=last,
                             total_run_count=runs, app=celery_app)

    local_later = recorded_at.replace(tzinfo=UTC) + timedelta(seconds=3)
    schedule = {
        "never-ran-here": entry("never-ran-here", local_later, 0),  # Celery's creation stamp: no run
        "ran-here-later": entry("ran-here-later", local_later, 4),
        "ran-here-earlier": entry("ran-here-earlier", local_later - timedelta(hours=1), 4),
        "not-recorded": entry("not-recorded", local_later, 0),
    }
    moved = adopt(schedule, {name: recorded_at for name in schedule if name != "not-recorded"})
    assert sorted(moved) == ["never-ran-here", "ran-here-earlier"]
    assert schedule["never-ran-here"].last_run_at == recorded_at.replace(tzinfo=UTC)
    assert schedule["ran-here-later"].last_run_at == local_later
    assert schedule["not-recorded"].last_run_at == local_later


class Recording(Scheduler):
    """Celery's own scheduler, its sends recorded instead of published."""

    producer = None

    def __init__(self) -> None:
        self.calls: list[str] = []
        super().__init__(app=celery_app, lazy=True)

    def reserve(self, entry):
        self.calls.append("reserve")
        return super().reserve(entry)

    def apply_entry(self, entry, producer=None) -> None:
        self.calls.append("apply")


def test_the_celery_behaviour_beats_scheduler_relies_on() -> None:
    """tasks/beat.py's reaches: ``tick`` reserves a run just before it applies it, and
    rebuilds its heap only when ``_heap`` is None."""
    scheduler = Recording()
    now = celery_app.now()
    scheduler.schedule["e"] = ScheduleEntry(name="e", task="t", schedule=timedelta(seconds=10),
                                            last_run_at=now - timedelta(seconds=11), app=celery_app)
    assert scheduler.tick() == 0
    assert scheduler.calls == ["reserve", "apply"]
    scheduler.schedule["e"].last_run_at = now - timedelta(seconds=11)  # what adopt() does
    assert scheduler.tick() > 5  # the heap still holds the next run's time ...
    scheduler._heap = None
    assert scheduler.tick() == 0  # ... until it is rebuilt from the entries
    assert scheduler.calls == ["reserve", "apply"] * 2


class Stopped(Exception):
    """What beat's stop handler raises (SystemExit there)."""


@pytest.fixture
def stop_handler() -> list[int]:
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        raise Stopped

    signal.signal(signal.SIGTERM, handler)
    return received


def test_a_stop_signal_in_a_tick_waits_for_its_sends(stop_handler: list[int]) -> None:
    sent = []
    alarm = signal.getsignal(signal.SIGALRM)
    with pytest.raises(Stopped):
        with StopAfterSends():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a repeat: one stop
            sent.append("run")  # the send goes on: not interrupted half-way
        sent.append("after")
    assert sent == ["run"] and stop_handler == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGALRM) is alarm


def test_a_send_that_hangs_is_cut_after_the_wait(stop_handler: list[int]) -> None:
    hung = threading.Event()
    started = time.monotonic()
    with pytest.raises(Stopped):
        with StopAfterSends():
            os.kill(os.getpid(), signal.SIGTERM)
            hung.wait(10)  # a publish to a broker that does not answer
    waited = time.monotonic() - started
    assert SEND_WAIT_SECONDS - 0.1 < waited < SEND_WAIT_SECONDS + 2, waited
    assert stop_handler == [signal.SIGTERM]


def test_a_tick_without_a_stop_leaves_the_handlers_as_they_were(stop_handler: list[int]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopAfterSends():
        pass
    assert signal.getsignal(signal.SIGTERM) is before and stop_handler == []


def test_an_alarm_armed_before_is_armed_again(stop_handler: list[int]) -> None:
    """Another user of SIGALRM (pytest-timeout, in these tests) keeps its alarm."""
    previous = signal.setitimer(signal.ITIMER_REAL, 100)
    try:
        with pytest.raises(Stopped):
            with StopAfterSends():
                os.kill(os.getpid(), signal.SIGTERM)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90 < left <= 100, left
    finally:
        signal.setitimer(signal.ITIMER_REAL, *previous)
