"""Docker, simulated for real: each container is PID 1 of its own PID namespace (unshare), stopped
like ``docker stop``: SIGTERM to PID 1, SIGKILL to the container after ``-t`` (10 s).

Busy every time: long jobs running (longer than the grace), a long poll in flight and a request
stream racing the stop (tests/workload.py). Then the set starts again on the same VAR_DIR and every
job accepted before or during the stop must succeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.managed import ManagedSet, assert_stopped_cleanly, require_root
from tests.procset import ProcessSet
from tests.workload import Workload, assert_handed_back_then_run
from tools.stopcheck.managers import Options

pytestmark = pytest.mark.e2e
JOB_SECONDS = 8  # longer than the grace: handed back, then run again after the restart


@pytest.fixture
def sets(tmp_path: Path) -> Iterator[list]:
    require_root()
    made: list = []
    yield made
    for s in made:
        s.cleanup()


def stop_busy_and_restart(ms: ManagedSet, sets: list, tmp_path: Path) -> list[dict]:
    """Busy set stopped the container way; restarted under honcho; the verdict on every job."""
    ms.start()
    ms.wait_ready()
    load = Workload(ms, jobs=2, job_seconds=JOB_SECONDS)
    load.start()
    ms.stop()
    rows = ms.finish()
    outcomes = load.finish()
    outcomes.assert_clean()  # no 5xx, no reset; only refused once the listener closed
    again = ProcessSet(tmp_path)  # same var/
    sets.append(again)
    assert_handed_back_then_run(load, ms, again)
    return rows


def test_honcho_as_pid1_grace_3(tmp_path: Path, sets: list) -> None:
    ms = ManagedSet.of("docker", tmp_path, Options(pid1="honcho"), SHUTDOWN_GRACE_SECONDS="3")
    sets.append(ms)
    rows = stop_busy_and_restart(ms, sets, tmp_path)
    assert_stopped_cleanly(ms, rows, ["honcho"], exit_code="143")
    assert "SIGTERM received" in ms.output()  # honcho, PID 1, had a handler: the kernel delivered it
    assert len(rows) >= 9  # honcho, its entries' shells and programs, pool children, redis-server


def test_honcho_as_pid1_grace_25_is_cut_to_fit_honchos_window(tmp_path: Path, sets: list) -> None:
    # honcho SIGKILLs everything 5 s after the first exit, whatever docker's 30 s: the set sees
    # HONCHO_PROCESS_NAME, warns and cuts its grace, so jobs are handed back instead of killed.
    ms = ManagedSet.of("docker", tmp_path, Options(pid1="honcho", timeout=30), SHUTDOWN_GRACE_SECONDS="25")
    sets.append(ms)
    rows = stop_busy_and_restart(ms, sets, tmp_path)
    assert_stopped_cleanly(ms, rows, ["honcho"], exit_code="143")
    out = ms.output()
    assert "SHUTDOWN_GRACE_SECONDS=25 does not fit honcho's SIGKILL" in out, out  # warned at start
    assert "graceful shutdown started (grace 3.0 s" in out, out  # and cut to fit


def test_each_entry_as_pid1_of_its_own_container(tmp_path: Path, sets: list) -> None:
    ms = ManagedSet.of("docker", tmp_path, Options(pid1="entry"), SHUTDOWN_GRACE_SECONDS="3")
    sets.append(ms)
    assert all(u.pid1 and u.argv[0] != "/bin/sh" for u in ms.plan.units)  # exec form, no shell
    rows = stop_busy_and_restart(ms, sets, tmp_path)
    assert_stopped_cleanly(ms, rows, ["web", "worker", "beat", "broker"])
    for r in rows:  # only PID 1 of each container got docker's SIGTERM
        assert bool(r["signals"]) == r["main"], r
