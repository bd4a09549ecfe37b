"""Every pool Celery users run stops the same bounded way (issue 14, point 2).

The demo under honcho with its worker on ``--pool P`` (the command line a user
writes): jobs longer than the grace running, then Ctrl+C. Each pool: no
SIGKILL (honcho's or the worker's own), no death by signal (the worker line
``exec``s, so honcho shows the worker's own exit code: SIGUSR2 to itself
showed ``rc=-12``), every process's shutdown sequence (its connections
closed), every running job back in the queue (``queued``, the attempt not
counted), nothing left running; after a restart every accepted job succeeds,
once. The start-up line says what a pool cannot do (threads, gevent,
eventlet: a task blocked where the hand-back cannot reach it); the stop log
says what happened instead.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.e2e.checks import PROCESSES, SEQUENCE, assert_shutdown_sequence
from tests.procset import ROOT, ProcessSet

LONG_SECONDS = 6  # longer than the 3 s grace
#: pool -> (concurrency, what the start-up WARNING says is not supported, or None)
POOLS = {
    "prefork": (2, None),
    "threads": (2, "a task blocked in a C call"),
    "solo": (1, None),
    "gevent": (2, "a task that does not yield"),
    "eventlet": (2, "a task that does not yield"),
}


def procfile(tmp_path: Path, pool: str, concurrency: int) -> Path:
    """The demo's Procfile with the worker on ``--pool`` (``exec``: honcho shows the worker's own exit)."""
    lines = []
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("worker:"):
            line = (f"worker: exec celery --app tasks.worker worker --loglevel INFO --without-mingle "
                    f"--without-gossip --pool {pool} --concurrency {concurrency}")
        lines.append(line)
    path = tmp_path / f"Procfile.{pool}"
    path.write_text("\n".join(lines) + "\n")
    return path


def started(ps: ProcessSet) -> float:
    """Start the set and wait until it is ready; when it was started (wall clock, as the ledger's times)."""
    at = time.time()
    ps.start()
    ps.wait_ready()
    return at


def assert_stopped_bounded(ps: ProcessSet, rc: int) -> None:
    out = ps.output
    assert rc == 130, out
    assert "SIGKILL" not in out, out  # neither honcho's nor the worker's own
    assert "exits now (exit code" not in out and "stop phase overran" not in out, out
    assert "worker.1 stopped (rc=0)" in out, out  # not rc=-12: SIGUSR2 to itself
    for name in PROCESSES:
        assert re.search(rf"{name}\.1 stopped \(rc=(?:0|-15)\)", out), (name, out)
        assert_shutdown_sequence(ps.lines(name), name, SEQUENCE)
    assert "Traceback" not in "\n".join(ps.lines("worker")), out
    survivors = ps.survivors()
    assert not survivors, [(p.pid, p.cmdline()) for p in survivors]


def warnings_at_start(ps: ProcessSet) -> list[str]:
    return [line for line in ps.lines("worker") if "WARNING" in line and "the hand-back cannot reach" in line]


@pytest.mark.parametrize("pool", list(POOLS))
def test_every_pool_stops_bounded_and_hands_back(procset: ProcessSet, tmp_path: Path, pool: str) -> None:
    concurrency, unsupported = POOLS[pool]
    path = procfile(tmp_path, pool, concurrency)
    first = procset.make()
    first.procfile = path
    started(first)

    running = [first.submit("sleep", seconds=LONG_SECONDS) for _ in range(concurrency)]
    for job_id in running:
        first.wait_status(job_id, "running", timeout=60)
    waiting = first.submit("echo", value={"after": "restart"})  # queued behind them
    rc, stop_seconds = first.stop_and_wait("ctrl_c", timeout=30)
    assert_stopped_bounded(first, rc)

    stored = first.stored_jobs()
    handed_back = [j for j in running if (stored[j]["status"], stored[j]["attempts"]) == ("queued", 0)]
    assert handed_back == running, [stored[j] for j in running]
    assert stored[waiting]["status"] == "queued", stored[waiting]
    notes = warnings_at_start(first)
    if unsupported is None:
        assert not notes, notes
    else:
        assert len(notes) == 1 and pool in notes[0] and unsupported in notes[0], first.lines("worker")

    again = procset.make()
    again.procfile = path
    restarted_at = started(again)
    reran = []
    for job_id in running:
        job = again.wait_status(job_id, "succeeded", timeout=LONG_SECONDS + 60)
        assert job["attempts"] == 1, job  # once: the handed-back run did not count, nor run twice
        reran.append(datetime.fromisoformat(job["started_at"]).replace(tzinfo=UTC).timestamp() - restarted_at)
    assert again.job(waiting, wait=10)["result"] == {"after": "restart"}
    rc, _ = again.stop_and_wait("ctrl_c", timeout=30)
    assert rc == 130 and "SIGKILL" not in again.output, again.output
    assert not again.survivors()
    lost = [j for j in [*running, waiting] if again.stored_jobs()[j]["status"] != "succeeded"]
    assert not lost, lost
    print(f"pool {pool}: stop {stop_seconds:.2f} s, SIGKILLs 0, handed back {len(handed_back)} of "
          f"{len(running)}, lost {len(lost)}, ran again {', '.join(f'{s:.2f}' for s in reran)} s "
          f"after the restart")
