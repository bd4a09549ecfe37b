"""Kubernetes, simulated for real from deploy/kubernetes.yaml: each container's ``command`` runs as PID 1
of its own PID namespace, every pod gets SIGTERM at once, SIGKILL after terminationGracePeriodSeconds,
and requests keep arriving for the drain (the Service has not noticed yet).

The manifest's grace (25 s) is lowered to 3 s here to keep the test short; its arithmetic is checked
by tests/unit/test_deploy_files.py, and the period used is derived the same way.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from tests.managed import (
    PROCFILE,
    ManagedSet,
    assert_stopped_cleanly,
    containers,
    kubernetes_plan,
    require_root,
)
from tests.procset import ProcessSet
from tests.workload import Workload, assert_handed_back_then_run
from tools.stopcheck.traffic import Traffic

pytestmark = pytest.mark.e2e
GRACE = 3.0


def test_manifest_commands_are_the_procfiles() -> None:
    for name, (command, _env) in containers().items():
        assert command == shlex.split(dict(PROCFILE)[name])


def window(traffic: Traffic, url: str, since: float, until: float) -> dict[str, int]:
    return dict(traffic.counts(url, since, until))


def test_pods_stop_with_a_drain_while_traffic_still_arrives(tmp_path: Path, redis_url: str) -> None:
    require_root()
    the_plan, drain = kubernetes_plan(GRACE)
    assert drain >= 3 and {u.name for u in the_plan.units} == {"web", "worker", "beat"}
    ms = ManagedSet(the_plan, tmp_path, REDIS_URL=redis_url)
    again: list[Any] = []
    try:
        ms.start()
        ms.wait_ready()
        load = Workload(ms, jobs=2, job_seconds=8)
        load.start()
        base = f"http://127.0.0.1:{ms.port}"
        traffic = Traffic([f"{base}/healthz", f"{base}/readyz"], interval=0.05).start()
        while traffic.counts(f"{base}/readyz")["200"] < 3:  # the client is running
            time.sleep(0.05)
        ms.stop()
        traffic.stop()
        rows = ms.finish()
        outcomes = load.finish()
        t0 = ms.engine.signal_at
        assert t0 is not None
        # During the drain (its first 0.1 s and last 0.3 s aside): a client every 50 ms is answered.
        served = window(traffic, f"{base}/healthz", t0 + 0.1, t0 + drain - 0.3)
        ready = window(traffic, f"{base}/readyz", t0 + 0.1, t0 + drain - 0.3)
        assert set(served) == {"200"} and served["200"] >= 20, served  # 0 refused, 0 reset, 0 5xx
        assert set(ready) == {"503"}, ready  # not ready: the Service stops routing here
        before = window(traffic, f"{base}/readyz", 0, t0 - 0.1)
        assert set(before) == {"200"}, before
        outcomes.assert_clean()
        assert_stopped_cleanly(ms, rows, ["web", "worker", "beat"])
        web_exit = next(r["exit_after_s"] for r in rows if r["unit"] == "web" and r["main"])
        assert web_exit >= drain  # it kept serving for the whole drain
        restarted = ProcessSet(tmp_path, env={"REDIS_URL": redis_url})
        again.append(restarted)
        assert_handed_back_then_run(load, ms, restarted)
    finally:
        ms.cleanup()
        for s in again:
            s.cleanup()
