"""Each program started alone in a terminal, stopped by Ctrl+C (issue 2, point 6).

Run directly, the terminal's SIGINT reaches the whole process tree at once:
gunicorn's master and workers, Celery's MainProcess and pool children.
"""

from __future__ import annotations

import concurrent.futures
import re
import shelve
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.e2e.checks import assert_shutdown_sequence
from tests.procset import ROOT, ProcessSet, run_python

GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"]
WORKER = [sys.executable, "-m", "celery", "--app", "tasks.worker", "worker", "--loglevel", "INFO",
          "--without-mingle", "--without-gossip"]
BEAT = [sys.executable, "-m", "celery", "--app", "tasks.beat_app", "beat", "--loglevel", "INFO"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The embedded Redis, started the way the Procfile does; the env to reach it."""
    env = ProcessSet(tmp_path).env
    proc = subprocess.Popen([sys.executable, "-m", "broker"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        run_python("import sys; from core import broker; sys.exit(not broker.wait_until_up(20))", env)
        yield env
    finally:
        proc.terminate()
        proc.wait(15)


def queue_job(env: dict[str, str], task: str, args: dict, publish: bool = True) -> str:
    return run_python(
        "from jobs import ledger; from tasks.jobs import run_job\n"
        f"ledger.ensure_schema(); job = ledger.create({task!r}, {args!r})\n"
        f"if {publish}: run_job.delay(job['id'])\n"
        "print(job['id'])", env)


def job_status(env: dict[str, str], job_id: str) -> str:
    return run_python(f"from jobs import ledger; print(ledger.get({job_id!r})['status'])", env)


@pytest.mark.parametrize("worker_class", ["gthread", "sync"])
def test_gunicorn_alone_answers_requests_in_flight_on_ctrl_c(tmp_path: Path, worker_class: str) -> None:
    ps = ProcessSet(tmp_path, command=GUNICORN,
                    env={"WEB_WORKER_CLASS": worker_class, "WEB_WORKERS": "3"})
    try:
        job_id = queue_job(ps.env, "sleep", {"seconds": 1}, publish=False)  # stays queued
        ps.start()
        ps.wait_for_line(r"Booting worker", timeout=30)
        deadline = time.monotonic() + 30
        while ps.http("GET", "/healthz").status != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            polls = [pool.submit(ps.http, "GET", f"/jobs/{job_id}?wait=30") for _ in range(3)]
            ps.wait_accepted(3)
            rc, _ = ps.stop_and_wait("ctrl_c")
            answers = [f.result(timeout=30) for f in polls]
        assert rc == 0, ps.output
        assert [a.status for a in answers] == [200, 200, 200], answers  # stock gunicorn: 500
        assert "signal received: SIGINT" in ps.output
        assert_shutdown_sequence(ps.lines(), "gunicorn")
        assert not ps.survivors()
    finally:
        ps.cleanup()


@pytest.fixture
def lone_worker(tmp_path: Path, broker: dict[str, str]) -> Iterator:
    """Start ``celery worker`` alone in a terminal, busy with one sleep job."""
    started: list[ProcessSet] = []

    def start(job_seconds: float, **env: str) -> tuple[ProcessSet, str]:
        ps = ProcessSet(tmp_path, command=WORKER, env=env)
        started.append(ps)
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60)
        job_id = queue_job(broker, "sleep", {"seconds": job_seconds})
        ps.wait_status(job_id, "running", read=lambda: {"status": job_status(broker, job_id)})
        return ps, job_id

    yield start
    for ps in started:
        ps.cleanup()


def test_celery_worker_alone_finishes_its_task_on_ctrl_c(lone_worker, broker: dict[str, str]) -> None:
    ps, job_id = lone_worker(1.5)
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert rc == 0, ps.output
    assert job_status(broker, job_id) == "succeeded"
    assert "WorkerLostError" not in ps.output
    assert "signal received: SIGINT" in ps.output
    assert_shutdown_sequence(ps.lines(), "worker")
    assert not ps.survivors()


def test_celery_worker_alone_hands_back_a_long_task_on_ctrl_c(lone_worker, broker: dict[str, str]) -> None:
    ps, job_id = lone_worker(60)
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert rc == 0, ps.output
    assert job_status(broker, job_id) == "queued"
    # The message is back on the queue: the broker holds it for the next worker.
    queued = run_python("from core import broker; print(broker.client().llen('jobs'))", broker)
    assert queued == "1"
    assert not ps.survivors()


def _sends(lines: list[str]) -> list[datetime]:
    """When beat published the periodic sweep, from its log lines."""
    stamps = []
    for line in lines:
        if "Sending due task requeue-stranded-jobs" in line:
            stamps.append(datetime.strptime(line.split(" ", 1)[0], "%H:%M:%S.%f"))
    return stamps


def test_celery_beat_alone_saves_its_schedule_on_ctrl_c(tmp_path: Path, broker: dict[str, str]) -> None:
    interval = 3.0
    env = {"SWEEP_INTERVAL_SECONDS": str(interval)}
    first = ProcessSet(tmp_path, command=BEAT, env=env)
    second = ProcessSet(tmp_path, command=BEAT, env=env)
    try:
        first.start()
        first.wait_for_line("Sending due task requeue-stranded-jobs", timeout=60)
        rc, _ = first.stop_and_wait("ctrl_c")
        assert rc == 0, first.output
        assert "signal received: SIGINT" in first.output
        assert_shutdown_sequence(first.lines(), "beat")
        assert not first.survivors()

        with shelve.open(str(Path(broker["VAR_DIR"]) / "celerybeat-schedule"), flag="r") as store:
            entry = store["entries"]["requeue-stranded-jobs"]
        assert entry.total_run_count == 1 and entry.last_run_at is not None

        second.start()
        second.wait_for_line("Sending due task requeue-stranded-jobs", timeout=30)
        rc, _ = second.stop_and_wait("ctrl_c")
        assert rc == 0
        (sent_before,) = _sends(first.lines())
        sent_after = _sends(second.lines())[0]
        gap = (sent_after - sent_before).total_seconds()
        # Not repeated at the restart (it remembered the last run), not skipped (it ran).
        assert gap >= interval - 0.2, gap
    finally:
        first.cleanup()
        second.cleanup()


def test_shutdown_log_names_each_process(tmp_path: Path, broker: dict[str, str]) -> None:
    ps = ProcessSet(tmp_path, command=WORKER)
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60)
        ps.stop_and_wait("ctrl_c")
        roles = set(re.findall(r" (worker(?:\.child)?)\[\d+\] INFO stopright: shutdown complete", ps.output))
        assert roles == {"worker", "worker.child"}, ps.output
    finally:
        ps.cleanup()



def test_a_second_ctrl_c_hands_back_at_once(lone_worker, broker: dict[str, str]) -> None:
    # With a 10-minute grace, only the second Ctrl+C can end this stop before the test's timeout.
    ps, job_id = lone_worker(600, SHUTDOWN_GRACE_SECONDS="600")
    ps.ctrl_c()
    ps.wait_for_line("graceful shutdown started", timeout=10)
    rc, _ = ps.stop_and_wait("ctrl_c", timeout=60)
    assert rc == 0, ps.output
    assert "SIGINT again: handing back running tasks now" in ps.output
    assert job_status(broker, job_id) == "queued"
    assert not ps.survivors()


def test_celery_beat_first_up_on_a_fresh_machine_makes_its_data_dir(tmp_path: Path,
                                                                     broker: dict[str, str]) -> None:
    """Beat may be first up on a fresh machine: nothing else has created var/ for its schedule store."""
    fresh = tmp_path / "fresh" / "var"
    env = {"VAR_DIR": str(fresh), "SWEEP_INTERVAL_SECONDS": "1",
           "REDIS_URL": f"unix://{broker['VAR_DIR']}/redis.sock?db=0"}
    ps = ProcessSet(tmp_path / "beat", command=BEAT, env=env)
    try:
        ps.start()
        ps.wait_for_line("Sending due task requeue-stranded-jobs", timeout=60)
        rc, _ = ps.stop_and_wait("ctrl_c")
        assert rc == 0, ps.output
        assert list(fresh.glob("celerybeat-schedule*")), ps.output
    finally:
        ps.cleanup()
