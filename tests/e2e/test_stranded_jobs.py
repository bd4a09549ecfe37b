"""Beat's periodic sweep: no accepted job stays stranded (issue 2, point 4)."""

from __future__ import annotations

import signal

import psutil

from tests.e2e.test_direct_ctrl_c import queue_job
from tests.procset import ProcessSet

FAST_SWEEP = {"SWEEP_INTERVAL_SECONDS": "1", "JOB_QUEUED_LEASE_SECONDS": "1", "JOB_LEASE_SECONDS": "2"}


def test_a_job_whose_message_was_lost_is_queued_again(procset: ProcessSet) -> None:
    ps = procset.make(**FAST_SWEEP)
    job_id = queue_job(ps.env, "echo", {"value": "found"}, publish=False)  # stored, never published
    ps.start()
    ps.wait_ready()
    job = ps.job(job_id, wait=20)
    assert job["status"] == "succeeded", job
    assert job["result"] == "found"
    assert "requeued 1 stranded job(s): " + job_id in ps.output


def _pool_children(ps: ProcessSet) -> list[psutil.Process]:
    """The Celery worker's pool children (the MainProcess respawns any that die)."""
    children = []
    for p in ps.snapshot():
        try:
            parent = p.parent()
            if parent and "celery" in " ".join(parent.cmdline()) and "worker" in parent.cmdline():
                children.append(p)
        except psutil.NoSuchProcess:
            continue
    assert children, ps.output
    return children


def test_a_job_whose_pool_child_was_killed_runs_again_after_its_lease(procset: ProcessSet) -> None:
    ps = procset.make(**FAST_SWEEP)
    ps.start()
    ps.wait_ready()
    job_id = ps.submit("sleep", seconds=2)
    ps.wait_status(job_id, "running")
    for child in _pool_children(ps):
        child.send_signal(signal.SIGKILL)  # an OOM kill, say: no cleanup, no hand-back
    job = ps.job(job_id, wait=30)
    if job["status"] != "succeeded":
        job = ps.job(job_id, wait=30)
    assert job["status"] == "succeeded", (job, ps.output)
    assert job["attempts"] == 2  # the killed run counts; the sweep made the second
