"""The README's first command: ``scripts/start`` sets up and starts the whole set."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.checks import assert_clean_stop
from tests.procset import ROOT, ProcessSet


def test_scripts_start_runs_the_set_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    ps = ProcessSet(tmp_path, command=[str(ROOT / "scripts" / "start")], runs_honcho=True)
    try:
        ps.start()
        ps.wait_ready(timeout=300)  # the first run may install the requirements
        job_id = ps.submit("echo", value={"quick": "start"})
        assert ps.job(job_id, wait=20)["result"] == {"quick": "start"}
        rc, _ = ps.stop_and_wait("ctrl_c")
        assert_clean_stop(ps, rc, 130)
    finally:
        ps.cleanup()
