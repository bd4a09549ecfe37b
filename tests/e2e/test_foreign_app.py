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

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.checks import SEQUENCE, assert_shutdown_sequence
from tests.procset import ROOT, ProcessSet, free_port, redis_server_dir

FOREIGN = ROOT / "examples" / "foreign"
PROCESSES = ("web", "worker", "beat", "redis")
LONG_JOBS, LONG_SECONDS = 4, 10  # each outlives the 3 s grace
CLIENTS, LOAD_SECONDS = 4, 6.0
NEVER = ("reset", "closed", "truncated", "hung")


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[Callable[[], ProcessSet]]:
    """Sets of examples/foreign on one var/ and one Redis port (a restart finds the queue), killed by pid."""
    (tmp_path / "var").mkdir()
    env = {"REDIS_PORT": str(free_port()), "WEB_CONCURRENCY": "2", "WORKER_CONCURRENCY": str(LONG_JOBS),
           "PYTHONPATH": str(ROOT),  # stopright, as `pip install` would put it on a user's path
           "PATH": str(redis_server_dir(tmp_path / "bin")) + os.pathsep + os.environ.get("PATH", "")}
    started: list[ProcessSet] = []

    def make() -> ProcessSet:
        ps = ProcessSet(tmp_path, env=env, cwd=FOREIGN)
        started.append(ps)
        return ps

    yield make
    for ps in started:
        ps.cleanup()


def start_ready(ps: ProcessSet) -> None:
    ps.start()
    ps.wait_for_line(r"\bready\.$", 60, name="worker")
    ps.wait_for_line(r"beat: Starting", 30, name="beat")
    deadline = time.monotonic() + 30
    while ps.http("GET", "/healthz").status != 200:
        assert time.monotonic() < deadline, ps.output
        time.sleep(0.05)
    ps.snapshot()


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


def run_load(ps: ProcessSet) -> subprocess.Popen[str]:
    """bench/load.py's job flow: POST /jobs, then GET /jobs/<id>, every request's outcome counted."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.load", "--port", str(ps.port), "--flow", "jobs", "--wait", "0",
         "--seconds", str(LOAD_SECONDS), "--concurrency", str(CLIENTS)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)


def assert_stopped_right(ps: ProcessSet, rc: int) -> None:
    out = ps.output
    assert rc == 130, out
    assert "SIGKILL" not in out, out  # neither honcho's nor the worker's own (a child not handing back)
    assert "exits now (exit code" not in out and "stop phase overran" not in out, out
    assert "still open after" not in out, out  # outlive did not have to stop Redis under a client
    for name in PROCESSES:
        assert f"{name}.1 stopped (rc=0)" in out or f"{name}.1 stopped (rc=-15)" in out, (name, out)
        assert_shutdown_sequence(ps.lines(name), name, SEQUENCE)
    survivors = ps.survivors()
    assert not survivors, [(p.pid, p.cmdline()) for p in survivors]


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
        out, _ = loader.communicate(timeout=60)
    result = json.loads(out)

    assert_stopped_right(ps, rc)
    bad = [event for event in result["events"] if event[2] in NEVER or event[2].startswith("answered:5")]
    assert not bad, (result["outcomes"], bad)
    assert not [e for e in result["events"] if e[2].startswith(("error:", "connect:"))], result["events"]
    answered = sum(n for counts in result["outcomes"].values() for kind, n in counts.items()
                   if kind.startswith("answered:2"))
    assert answered >= 20, result["outcomes"]
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
