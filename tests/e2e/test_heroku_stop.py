"""Heroku, simulated for real: each Procfile entry alone in its "dyno" (``bash -c``, DYNO set), SIGTERM
to every process of the dyno at once, SIGKILL to what is left 30 s later; SHUTDOWN_GRACE_SECONDS=25.

A deploy: a new worker dyno starts, then the old dynos are stopped. Jobs longer than the grace run on
the old worker; it hands them back at 25 s and the new worker runs them; nothing is SIGKILLed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.managed import ManagedSet, assert_stopped_cleanly
from tests.workload import Workload
from tools.stopcheck.managers import Options

pytestmark = pytest.mark.e2e
GRACE = 25
JOB_SECONDS = GRACE + 12  # still running when the grace ends, even if the new dyno is slow to start



def test_a_deploy_hands_long_jobs_to_the_new_worker_dyno(tmp_path: Path, redis_url: str) -> None:
    ms = ManagedSet.of("heroku", tmp_path, Options(), SHUTDOWN_GRACE_SECONDS=str(GRACE), REDIS_URL=redis_url)
    old = ["web", "worker", "beat", "broker"]
    try:
        assert all(u.argv[:2] == ("/bin/bash", "-c") and u.env["DYNO"] for u in ms.plan.units)
        assert ms.plan.units[0].policy.timeout == 30
        ms.start()
        ms.wait_ready()
        load = Workload(ms, jobs=2, job_seconds=JOB_SECONDS)
        load.start()
        ms.start(["worker"], as_name="worker-new")  # the new release's dyno, consuming at once
        ms.engine.wait_up(1.0, timeout=30)
        ms.stop(old)  # SIGTERM to every process of the old dynos at once
        rows = ms.finish()
        outcomes = load.finish()
        outcomes.assert_clean()  # answered or refused (web gone), never reset, never 5xx
        assert_stopped_cleanly(ms, [r for r in rows if r["unit"] in old], old)
        stopped = [r for r in rows if r["unit"] in old]
        assert all(r["signals"] and r["signals"][0]["signal"] == "SIGTERM" for r in stopped)  # the whole tree
        assert len([r for r in stopped if r["unit"] == "worker"]) >= 3  # MainProcess and its pool children
        out = ms.output("worker")
        assert f"grace {GRACE:.1f} s" in out and "handed back" in out, out  # the grace was not cut
        for job_id in load.long_ids:
            assert ms.stored_jobs()[job_id]["attempts"] <= 1
        ms.start(["web"], as_name="web-new")  # the new web dyno, on the same port
        ms.wait_ready()
        verdict = load.verdict(ms, timeout=JOB_SECONDS + 30)
        verdict.assert_none_lost()  # the new worker ran what the old one handed back
        for job_id in load.long_ids:
            assert verdict.jobs[job_id]["attempts"] == 1, verdict.jobs[job_id]  # a hand-back costs none
        assert "handed back" not in ms.output("worker-new")
    finally:
        ms.cleanup()
