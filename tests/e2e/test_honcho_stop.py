"""``honcho start`` of the real set, stopped by Ctrl+C or SIGTERM (issue 2, point 6)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import pytest

from tests.e2e.checks import assert_clean_stop, assert_handed_back_jobs_run
from tests.procset import ProcessSet


@pytest.mark.parametrize(("how", "expected_rc"), [("ctrl_c", 130), ("sigterm", 143)])
def test_idle_set_stops_cleanly(procset: ProcessSet, how: str, expected_rc: int) -> None:
    procset.start()
    procset.wait_ready()
    rc, _elapsed = procset.stop_and_wait(how)
    assert_clean_stop(procset, rc, expected_rc)


def test_jobs_that_fit_the_grace_finish_during_the_stop(procset: ProcessSet) -> None:
    procset.start()
    procset.wait_ready()
    ids = [procset.submit("sleep", seconds=1.5) for _ in range(2)]
    for job_id in ids:
        procset.wait_status(job_id, "running")
    rc, _ = procset.stop_and_wait("ctrl_c")
    assert_clean_stop(procset, rc, 130)
    stored = procset.stored_jobs()
    assert [stored[i]["status"] for i in ids] == ["succeeded", "succeeded"]
    assert [stored[i]["attempts"] for i in ids] == [1, 1]
    assert "handed back" not in procset.output


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_long_jobs_are_handed_back_and_run_after_restart(procset: ProcessSet, how: str) -> None:
    procset.start()
    procset.wait_ready()
    running = [procset.submit("sleep", seconds=12) for _ in range(2)]
    for job_id in running:
        procset.wait_status(job_id, "running")
    waiting = procset.submit("echo", value={"after": "restart"})  # queued behind them
    rc, _ = procset.stop_and_wait(how)
    assert_clean_stop(procset, rc, 130 if how == "ctrl_c" else 143)

    stored = procset.stored_jobs()
    for job_id in running:
        assert stored[job_id]["status"] == "queued", stored[job_id]
        assert stored[job_id]["attempts"] == 0  # a shutdown does not use up an attempt
    assert stored[waiting]["status"] == "queued"
    assert "WorkerLostError" not in procset.output

    again = procset.make()
    again.start()
    again.wait_ready()
    assert_handed_back_jobs_run(again, running, waiting)
    rc, _ = again.stop_and_wait("ctrl_c")
    assert_clean_stop(again, rc, 130)
    assert not [j for j in again.stored_jobs().values() if j["status"] == "failed"]


def test_requests_in_flight_are_answered(procset: ProcessSet) -> None:
    procset.start()
    procset.wait_ready()
    job_id = procset.submit("sleep", seconds=30)
    procset.wait_status(job_id, "running")

    # Long polls that cannot end on their own before the stop: in flight for sure.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    long_polls = [pool.submit(procset.http, "GET", f"/jobs/{job_id}?wait=30") for _ in range(4)]
    # And a stream of short requests racing the stop.
    stop_hammer = threading.Event()

    def hammer() -> list[int]:
        codes = []
        while not stop_hammer.is_set():
            codes.append(procset.http("GET", "/healthz", timeout=10).status)
        return codes

    hammers = [pool.submit(hammer) for _ in range(2)]
    procset.wait_accepted(len(long_polls))  # the server holds them
    rc, _ = procset.stop_and_wait("sigterm")
    stop_hammer.set()
    answers = [f.result(timeout=30) for f in long_polls]
    codes = [c for f in hammers for c in f.result(timeout=30)]
    pool.shutdown()

    assert_clean_stop(procset, rc, 143)
    assert [a.status for a in answers] == [200] * 4, answers
    assert all(a.body["status"] == "running" for a in answers)  # answered with the state it had
    assert 200 in codes
    assert not [c for c in codes if c >= 500], codes  # 0 = refused after the listener closed


def test_a_larger_budget_does_not_slow_a_stop_whose_work_is_done(procset: ProcessSet) -> None:
    # A deploy with 30 s (Heroku) raises the budget: the stop still ends when the work does,
    # well inside honcho's 5 s (a fixed wait for the budget would be SIGKILLed).
    ps = procset.make(SHUTDOWN_GRACE_SECONDS="20")
    ps.start()
    ps.wait_ready()
    job_id = ps.submit("sleep", seconds=1)
    ps.wait_status(job_id, "running")
    rc, _ = ps.stop_and_wait("sigterm")
    assert_clean_stop(ps, rc, 143)
    assert ps.stored_jobs()[job_id]["status"] == "succeeded"


@pytest.mark.parametrize("how", ["terminal closed", "honcho killed"])
def test_nothing_runs_on_when_honcho_dies(procset: ProcessSet, how: str) -> None:
    # honcho dies (SIGHUP from a closed terminal, or SIGKILL) without stopping its
    # children; each child follows its parent's death with the same graceful stop.
    procset.start()
    procset.wait_ready()
    short = procset.submit("sleep", seconds=1.5)
    long = procset.submit("sleep", seconds=30)
    for job_id in (short, long):
        procset.wait_status(job_id, "running")
    tree = procset.snapshot()
    assert len(tree) >= 8
    if how == "terminal closed":
        os.killpg(procset.proc.pid, signal.SIGHUP)  # the tty's hang-up, to honcho's group
    else:
        procset.proc.kill()
    procset.proc.wait(10)
    deadline = time.monotonic() + 20
    while procset.survivors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not procset.survivors(), [p.cmdline() for p in procset.survivors()]
    stored = procset.stored_jobs()
    assert stored[short]["status"] == "succeeded", stored[short]  # the grace was honoured
    assert (stored[long]["status"], stored[long]["attempts"]) == ("queued", 0)  # handed back
