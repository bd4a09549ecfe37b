"""systemd, simulated from the unit files the project ships (``scripts/export systemd DIR``, the
templates in deploy/honcho/): each service's ExecStart with its Environment= only, KillMode, KillSignal,
TimeoutStopSec, and the stop order systemd derives from After= (the broker last).

Busy set (long jobs, a long poll, a request stream), every unit stopped at once as by
``systemctl stop APP.target``; then a restart on the same VAR_DIR, and nothing may be lost.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.managed import ManagedSet, assert_stopped_cleanly
from tests.procset import ROOT, ProcessSet, free_port
from tests.workload import Workload, assert_handed_back_then_run
from tools.stopcheck.managers import Options

pytestmark = pytest.mark.e2e


def export_units(tmp_path: Path, port: int) -> Path:
    """The project's own units for a set on ``port`` with its var/ in tmp_path."""
    env_file = tmp_path / "app.env"
    env_file.write_text(f"VAR_DIR={tmp_path / 'var'}\nSHUTDOWN_GRACE_SECONDS=3\nPYTHONUNBUFFERED=1\n")
    out = tmp_path / "units"
    venv = Path(sys.executable).parent.parent
    subprocess.run([str(ROOT / "scripts" / "export"), "systemd", str(out), "-p", str(port)], cwd=ROOT,
                   env={**os.environ, "VENV": str(venv), "ENV_FILE": str(env_file), "APP": "app"},
                   check=True, capture_output=True, timeout=120)
    return out


def test_units_stop_a_busy_set_broker_last_nothing_lost(tmp_path: Path) -> None:
    port = free_port()
    units_dir = export_units(tmp_path, port)
    ms = ManagedSet.of("systemd", tmp_path, Options(units_dir=units_dir))
    ms.port = port  # the units carry their own PORT (honcho export -p)
    names = {u.entry: u.name for u in ms.plan.units}
    assert set(names) == {"web", "worker", "beat", "broker"}
    broker = next(u for u in ms.plan.units if u.entry == "broker")
    assert set(broker.policy.after) == {names["web"], names["worker"], names["beat"]}  # stopped last
    assert all(u.clean_env and u.argv[0].startswith("/") for u in ms.plan.units)  # no shell, no PATH lookup
    again: list[ProcessSet] = []
    try:
        ms.start()
        ms.wait_ready()
        load = Workload(ms, jobs=2, job_seconds=8)
        load.start()
        ms.stop()
        rows = ms.finish()
        outcomes = load.finish()
        outcomes.assert_clean()
        assert_stopped_cleanly(ms, rows, list(names.values()))
        states = {n: r.state for n, r in ms.engine.running.items()}
        assert all(states[broker.name].begun >= states[n].done for n in broker.policy.after)
        restarted = ProcessSet(tmp_path)
        again.append(restarted)
        assert_handed_back_then_run(load, ms, restarted)
    finally:
        ms.cleanup()
        for s in again:
            s.cleanup()
