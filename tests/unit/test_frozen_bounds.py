"""What bounds a stop and a request when a server does not answer (issue 14), without a server.

The real frozen PostgreSQL and the broker down at a stop are in tests/e2e/test_frozen_servers.py;
here the pieces: a thread's database deadline, the bounded ``on_hand_back``, and the one line
(and spool entry) of a requeue the broker refused. A hand-back the database missed:
test_handbacks.py.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from types import SimpleNamespace

import psycopg
import pytest
from celery import Celery

from core import db
from stopright import registry, requeue, worker_stop

# -- core/db.py: every wait within the setting, or a thread's shorter deadline ---------------------


def test_a_deadline_shortens_the_wait_budget_and_nests(var_dir, monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_TIMEOUT_SECONDS", "2")
    db.get_settings.cache_clear()
    assert db._wait_budget() == 2.0
    with db.deadline(0.5):
        assert 0.4 < db._wait_budget() <= 0.5
        with db.deadline(10):  # an outer, earlier deadline wins
            assert db._wait_budget() <= 0.5
        with db.deadline(0.1):
            assert db._wait_budget() <= 0.1
    assert db._wait_budget() == 2.0
    seen: list[float] = []
    with db.deadline(0.1):  # per thread: another thread keeps the setting
        worker = threading.Thread(target=lambda: seen.append(db._wait_budget()))
        worker.start()
        worker.join()
    assert seen == [2.0]


def test_a_passed_deadline_leaves_no_budget(var_dir) -> None:
    with db.deadline(0.0):
        time.sleep(0.01)
        assert db._wait_budget() == 0.0


def test_psycopgs_wait_is_what_the_bounded_connection_overrides() -> None:
    """core/db.py relies on psycopg's Connection.wait(gen, interval, timeout) and its _WaitTimeout."""
    _, bounded = db._psycopg()
    upstream = inspect.signature(psycopg.Connection.wait).parameters
    assert list(upstream) == ["self", "gen", "interval", "timeout"]
    assert upstream["interval"].default == db.PSYCOPG_WAIT_INTERVAL
    assert list(inspect.signature(bounded.wait).parameters) == list(upstream)
    assert issubclass(psycopg.errors._WaitTimeout, psycopg.OperationalError)
    source = inspect.getsource(psycopg.Connection.wait)
    assert "waiting.wait(" in source and "timeout=timeout" in source


def test_an_abandoned_connection_attempt_is_closed_when_it_succeeds_late() -> None:
    closed = threading.Event()
    release = threading.Event()

    class Late:
        def close(self) -> None:
            closed.set()

    def connect() -> Late:
        release.wait(5)
        return Late()

    attempt = db._Attempt(connect)
    assert attempt.wait(0.05) is False  # the caller gives up: the attempt goes on alone
    release.set()
    assert closed.wait(5), "a connection made after its caller left was not closed"


def test_a_failed_attempt_raises_in_the_caller_without_its_frames() -> None:
    def connect() -> None:
        raise psycopg.OperationalError("refused")

    attempt = db._Attempt(connect)
    assert attempt.wait(5) is True
    with pytest.raises(psycopg.OperationalError) as raised:
        attempt.result()
    # The frames that held the failed attempt's socket open were dropped in the thread.
    assert [entry.name for entry in raised.traceback if entry.name in ("connect", "_run")] == []


# -- stopright/worker_stop.py: on_hand_back after the kill, bounded ----------------------------------


def test_on_hand_back_runs_with_the_close_handlers_bounded_and_its_overrun_logged(caplog) -> None:
    stuck = threading.Event()
    calls: list[str] = []

    def on_hand_back(request) -> None:
        calls.append(request.id)
        stuck.wait(10)  # a database that does not answer

    registry.register("database", lambda: calls.append("database closed"))  # opened at start
    stop = worker_stop.WorkerStop(grace=1.0, on_hand_back=on_hand_back)
    stop._handed_back_for([SimpleNamespace(name="t", id=str(n)) for n in range(2)])
    assert calls == []  # not before the kill's phase is over: with the close handlers
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="stopright"):
        registry.current().close_all()
    took = time.monotonic() - started
    stuck.set()
    assert calls == ["0", "database closed"]  # before what was opened earlier; the stop went on
    assert took < worker_stop.ON_HAND_BACK_SECONDS + 2  # generous: the point is that it returned
    assert "closing on_hand_back for 2 killed task(s) timed out" in caplog.text
    assert "stuck.wait" in caplog.text  # where it hung, for whoever reads the log


def test_on_hand_back_is_called_for_each_task_and_a_failure_does_not_stop_the_others(caplog) -> None:
    calls: list[str] = []

    def on_hand_back(request) -> None:
        calls.append(request.id)
        if request.id == "0":
            raise RuntimeError("boom")

    stop = worker_stop.WorkerStop(grace=1.0, on_hand_back=on_hand_back)
    stop._handed_back_for([SimpleNamespace(name="t", id="0"), SimpleNamespace(name="t", id="1")])
    with caplog.at_level(logging.INFO, logger="stopright"):
        registry.current().close_all()
    assert calls == ["0", "1"]
    assert "on_hand_back failed for task t[0]" in caplog.text
    assert "closed on_hand_back for 2 killed task(s)" in caplog.text


# -- stopright/requeue.py: a refused requeue, one line, spooled on Redis -----------------------------


def _request(broker: str) -> SimpleNamespace:
    return SimpleNamespace(name="jobs.run", id="abc", app=Celery(broker=broker))


def test_a_refused_requeue_on_redis_is_spooled_and_told_in_one_line(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv(requeue.SPOOL_ENV, str(tmp_path))
    reporter = requeue._RefusedRequeue(_request("redis://127.0.0.1:1/3"))
    with caplog.at_level(logging.WARNING, logger="stopright.requeue"):
        reporter.critical("Couldn't reject %r, reason: %r", "tag-1", ConnectionError("down"),
                          exc_info=True)
    [entry] = [json.loads(line) for line in (tmp_path / requeue.SPOOL_NAME).read_text().splitlines()]
    assert (entry["tag"], entry["task"]) == ("tag-1", "jobs.run[abc]")
    assert entry["broker"].startswith("redis://") and entry["broker"].endswith("/3")
    [record] = caplog.records
    assert "requeue refused by the broker" in record.getMessage() and record.exc_info is None
    assert "requeued when the worker next connects" in record.getMessage()


def test_a_refused_requeue_on_rabbitmq_is_left_to_rabbitmq(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv(requeue.SPOOL_ENV, str(tmp_path))
    reporter = requeue._RefusedRequeue(_request("amqp://guest:secret@127.0.0.1:1//"))
    with caplog.at_level(logging.WARNING, logger="stopright.requeue"):
        reporter.critical("Couldn't reject %r, reason: %r", 7, ConnectionError("down"), exc_info=True)
    assert not (tmp_path / requeue.SPOOL_NAME).exists()
    assert "RabbitMQ requeues the unacked messages" in caplog.text and "secret" not in caplog.text


def test_the_spool_has_a_place_that_outlives_the_worker(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(requeue.SPOOL_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert requeue.spool_path() == tmp_path / "stopright" / requeue.SPOOL_NAME
    monkeypatch.setenv(requeue.SPOOL_ENV, "/srv/spool")
    assert str(requeue.spool_path()) == f"/srv/spool/{requeue.SPOOL_NAME}"
