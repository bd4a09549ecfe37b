"""Assertions shared by the end-to-end tests: what a clean stop looks like."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from tests.procset import ProcessSet

PROCESSES = ("web", "worker", "beat", "broker")
SEQUENCE = ("signal received: SIG", "graceful shutdown started", "closing ", "closed ",
            "shutdown complete in ")


def assert_clean_stop(ps: ProcessSet, rc: int, expected_rc: int,
                      nothing_to_close: tuple[str, ...] = ()) -> None:
    out = ps.output
    assert rc == expected_rc, out
    assert "sending SIGKILL" not in out, out
    # honcho runs each line in `sh -c` (the Procfile has no `exec`, which foreman's
    # exports cannot run), and dash dies of the SIGTERM honcho sends its group:
    # honcho shows the shell's -15. The program's own end is its logged sequence.
    assert "exits now (exit code" not in out, out
    for name in PROCESSES:
        assert re.search(rf"{name}\.1 stopped \(rc=(?:0|-15)\)", out), f"{name} did not exit 0:\n{out}"
        steps = [s for s in SEQUENCE if not s.startswith("clos")] if name in nothing_to_close else SEQUENCE
        assert_shutdown_sequence(ps.lines(name), name, steps)
    survivors = ps.survivors()
    assert not survivors, f"left running: {[(p.pid, p.cmdline()) for p in survivors]}"


def assert_shutdown_sequence(lines: list[str], name: str, steps: Sequence[str] = SEQUENCE) -> None:
    """The process logged each step of the shutdown sequence, in order."""
    position = 0
    for step in steps:
        for index in range(position, len(lines)):
            if step in lines[index]:
                position = index
                break
        else:
            raise AssertionError(f"{name}: no {step!r} after line {position}:\n" + "\n".join(lines))


def assert_handed_back_jobs_run(ps: ProcessSet, handed_back: Sequence[str], waiting: str) -> None:
    """After a restart: each job a stop handed back runs once (attempts 1), and the one queued behind."""
    for job_id in handed_back:
        job = ps.wait_status(job_id, "succeeded", timeout=60)
        assert job["attempts"] == 1, job
    assert ps.job(waiting, wait=10)["result"] == {"after": "restart"}


def ran_again(ps: ProcessSet, job_id: str, first_start: str, timeout: float = 60) -> dict[str, Any]:
    """The job once a new run of it started (or finished) after the one that began at ``first_start``."""
    deadline = time.monotonic() + timeout
    while True:
        answer = ps.http("GET", f"/jobs/{job_id}")
        job = answer.body if answer.status == 200 else {}
        if job.get("started_at") not in (None, first_start):
            return job
        assert time.monotonic() < deadline, (job_id, answer)
        time.sleep(0.05)
