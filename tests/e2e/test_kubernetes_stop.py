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
import yaml

from stopcheck.managers import Plan, Unit
from stopcheck.policy import MAIN, TREE, Policy
from stopcheck.traffic import Traffic
from tests.managed import PROCFILE, ManagedSet, assert_stopped_cleanly, require_root
from tests.procset import ROOT, ProcessSet
from tests.workload import Workload, assert_handed_back_then_run

pytestmark = pytest.mark.e2e
GRACE = 3.0


def containers() -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each Deployment's container: its command and settings (ConfigMap, then its own env)."""
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()) if d]
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    out = {}
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env: dict[str, str] = {}
        for source in c.get("envFrom", []):
            env.update(maps.get(source.get("configMapRef", {}).get("name"), {}))
        env.update({e["name"]: e["value"] for e in c.get("env", [])})
        out[d["metadata"]["name"]] = (c["command"], env)
    return out


def kubernetes_plan() -> tuple[Plan, float]:
    units = []
    drain = 0.0
    for name, (command, env) in containers().items():
        env = {**env, "SHUTDOWN_GRACE_SECONDS": str(GRACE), "BIND_HOST": "127.0.0.1"}  # test: short, local
        env.pop("PORT")
        env.pop("VAR_DIR")
        period = float(env.get("SHUTDOWN_DRAIN_SECONDS", 0)) + GRACE + 2 + 3  # as the manifest derives it
        drain = max(drain, float(env.get("SHUTDOWN_DRAIN_SECONDS", 0)))
        units.append(Unit(name, tuple(command), Policy(signal_to=MAIN, timeout=period, kill_to=TREE), name,
                          pid1=True, env=env))
    return Plan("kubernetes", tuple(units), "SIGTERM to PID 1 of every container at once"), drain



def test_manifest_commands_are_the_procfiles() -> None:
    for name, (command, _env) in containers().items():
        assert command == shlex.split(dict(PROCFILE)[name])


def window(traffic: Traffic, url: str, since: float, until: float) -> dict[str, int]:
    return dict(traffic.counts(url, since, until))


def test_pods_stop_with_a_drain_while_traffic_still_arrives(tmp_path: Path, redis_url: str) -> None:
    require_root()
    the_plan, drain = kubernetes_plan()
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
