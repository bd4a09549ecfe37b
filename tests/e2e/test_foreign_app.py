"""examples/foreign: the stock reference app plus stopright's lines, stopped busy under honcho (issue 9).

The same checks as the demo's busy Ctrl+C (test_honcho_stop.py, test_load_stop.py),
on an app that has no job ledger: long jobs running (longer than the 3 s
grace) and a stream of requests posting and reading jobs when Ctrl+C comes;
then no 5xx, no reset or dropped request, every process stopped on its own
(no SIGKILL), nothing left running, every running job handed back, and after
a restart every accepted job succeeded: 0 lost. What the jobs' states are
comes from the app's own API (Celery's result backend on the Redis of its
Procfile, which stopright.outlive keeps up until its clients have gone).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e import examples
from tests.e2e.examples import example_sets, load_result, run_load, start_ready
from tests.procset import ROOT, ProcessSet, free_port, redis_server_dir

FOREIGN = ROOT / "examples" / "foreign"
PROCESSES = ("web", "worker", "beat", "redis")
LONG_JOBS, LONG_SECONDS = 4, 10  # each outlives the 3 s grace


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[Callable[[], ProcessSet]]:
    """Sets of examples/foreign on one var/ and one Redis port (a restart finds the queue), killed by pid."""
    (tmp_path / "var").mkdir()
    env = {"REDIS_PORT": str(free_port()), "WEB_CONCURRENCY": "2", "WORKER_CONCURRENCY": str(LONG_JOBS),
           "PATH": str(redis_server_dir(tmp_path / "bin")) + os.pathsep + os.environ.get("PATH", "")}
    yield from example_sets(tmp_path, env, FOREIGN)


def redis_url(ps: ProcessSet) -> str:
    return f"redis://127.0.0.1:{ps.env['REDIS_PORT']}/0"


#: Asks the worker (Celery's ``inspect active``) until every job given is running; exits 0 then.
INSPECT = """
import sys, time
from celery import Celery
app = Celery("foreign-test", broker=sys.argv[1])
ids, deadline = set(sys.argv[2:]), time.monotonic() + 30
while time.monotonic() < deadline:
    replies = app.control.inspect(timeout=1.0).active() or {}
    if ids <= {task["id"] for tasks in replies.values() for task in tasks}:
        sys.exit(0)
sys.exit(f"not all running: {replies}")
"""


def wait_running(ps: ProcessSet, ids: list[str]) -> None:
    """Until the worker reports every job of ``ids`` running.

    The reference app has no "running" state (no ``task_track_started``): the
    worker itself is asked, from a process of its own, so that none of the
    test's Redis connections is left open for the stop (outlive would wait for it).
    """
    done = subprocess.run([sys.executable, "-c", INSPECT, redis_url(ps), *ids], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.stdout, done.stderr, ps.output[-3000:])


def wait_queued(ps: ProcessSet, count: int, timeout: float = 30) -> None:
    """Until ``count`` jobs wait in Celery's queue (the load is flowing); the probe then disconnects."""
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(redis_url(ps)) as client:
        while client.llen("celery") < count:
            assert time.monotonic() < deadline, ps.output[-3000:]
            time.sleep(0.05)


def assert_stopped_right(ps: ProcessSet, rc: int) -> None:
    examples.assert_stopped_right(ps, rc, PROCESSES)
    assert "still open after" not in ps.output, ps.output  # outlive did not stop Redis under a client


def test_busy_ctrl_c_hands_back_every_job_and_loses_none(foreign) -> None:
    ps = foreign()
    start_ready(ps)
    long_jobs = [ps.submit("sleep", seconds=LONG_SECONDS) for _ in range(LONG_JOBS)]
    wait_running(ps, long_jobs)
    loader = run_load(ps)
    try:
        wait_queued(ps, 20)  # every pool child is busy: the stream's jobs queue up
        rc, stop_seconds = ps.stop_and_wait("ctrl_c", timeout=30)
    finally:
        result = load_result(loader)

    assert_stopped_right(ps, rc)
    for job_id in long_jobs:
        assert f"task reftasks.run_job[{job_id}] handed back to the queue" in ps.output, ps.output
    assert "WorkerLostError" not in ps.output and "Traceback" not in ps.output, ps.output

    accepted = [*long_jobs, *result["accepted"]]
    print(f"stop {stop_seconds:.2f} s, requests {result['outcomes']}, {len(accepted)} jobs accepted")
    again = foreign()
    start_ready(again)
    for job_id in accepted:  # a handed-back job runs again from the start: all 10 s
        again.wait_status(job_id, "succeeded", timeout=LONG_SECONDS + 60)
    rc, _ = again.stop_and_wait("ctrl_c", timeout=30)
    assert rc == 130 and "SIGKILL" not in again.output, again.output
    assert not again.survivors()
