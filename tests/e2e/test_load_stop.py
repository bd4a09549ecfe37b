"""A stop under load: 32 clients posting jobs and long-polling them when the stop comes (issue 7).

Every request the clients made ends in exactly one outcome (tools/bench/load.py
``--flow jobs``): answered, refused (never accepted: allowed once the stop
has begun), or reset / closed without an answer / truncated / hung (never
allowed). Then the set is started again on the same data and every job that
was accepted (202) must end ``succeeded``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.e2e.checks import assert_clean_stop
from tests.procset import ROOT, ProcessSet

CLIENTS = 32
LOAD_SECONDS = 6.0
STOP_AFTER = 1.5
NEVER = ("reset", "closed", "truncated", "hung")


def run_load(ps: ProcessSet, seconds: float = LOAD_SECONDS) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tools.bench.load", "--port", str(ps.port), "--flow", "jobs",
         "--seconds", str(seconds), "--concurrency", str(CLIENTS), "--wait", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)


def wait_for_answers(ps: ProcessSet, count: int, timeout: float = 30) -> None:
    """Block until the load has had ``count`` jobs accepted (the ledger holds them)."""
    deadline = time.monotonic() + timeout
    while len(ps.stored_jobs()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} jobs accepted:\n{ps.output[-3000:]}"
        time.sleep(0.05)


def outcomes_by_kind(result: dict) -> dict[str, int]:
    totals: dict[str, int] = {}
    for counts in result["outcomes"].values():
        for outcome, n in counts.items():
            kind = outcome if not outcome.startswith("answered:") else f"answered:{outcome[9]}xx"
            totals[kind] = totals.get(kind, 0) + n
    return totals


@pytest.mark.parametrize(("how", "expected_rc"), [("ctrl_c", 130), ("sigterm", 143)])
def test_a_loaded_stop_resets_nothing_and_loses_no_job(procset: ProcessSet, how: str,
                                                       expected_rc: int) -> None:
    procset.start()
    procset.wait_ready()
    loader = run_load(procset)
    try:
        wait_for_answers(procset, 50)  # the load is flowing
        rc, _ = procset.stop_and_wait(how)
    finally:
        out, _ = loader.communicate(timeout=60)
    result = json.loads(out)
    totals = outcomes_by_kind(result)

    assert_clean_stop(procset, rc, expected_rc)
    assert "stop phase overran" not in procset.output, procset.output
    bad = [event for event in result["events"] if event[2] in NEVER or event[2].startswith("answered:5")]
    assert not bad, (totals, bad)
    assert totals.get("answered:2xx", 0) >= 50, totals
    assert not [k for k in totals if k.startswith(("error:", "connect:"))], totals

    accepted = set(result["accepted"])
    stored = procset.stored_jobs()
    assert accepted <= set(stored), "a 202 was answered for a job the ledger does not hold"
    again = procset.make()
    again.start()
    again.wait_ready()
    deadline = time.monotonic() + 60
    for job_id in accepted:
        again.wait_status(job_id, "succeeded", max(1.0, deadline - time.monotonic()), long_poll=10)
    rc, _ = again.stop_and_wait("ctrl_c")
    assert_clean_stop(again, rc, 130)
