"""The real set run by a simulated manager or platform (stopcheck's engine), for the e2e tests.

A :class:`ManagedSet` starts the project's Procfile entries the way a plan
says (containers as PID 1 of a PID namespace, dynos, systemd units), on a
free port with its own ``VAR_DIR``, stops them with the manager's semantics,
and checks every process the way ``scripts/shutdown-report --manager`` does
(it uses the same rows). Whatever it started is killed by pid in
:meth:`ManagedSet.cleanup`, even when a test fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.procset import ROOT, AppClient, free_port
from tests.servers import missing
from tools.stopcheck import report
from tools.stopcheck.engine import Engine
from tools.stopcheck.managers import Options, Plan, Unit, plan
from tools.stopcheck.policy import MAIN, TREE, Policy
from tools.stopcheck.text import parse_procfile

OWN_SETTINGS = ("REDIS_URL", "BROKER_URL", "CELERY_BROKER_URL", "DATABASE_URL", "SHUTDOWN_GRACE_SECONDS",
                "SHUTDOWN_DRAIN_SECONDS", "HONCHO_PROCESS_NAME", "DYNO", "PS")  # the developer's stay out
PROCFILE = parse_procfile((ROOT / "Procfile").read_text())


def require_root() -> None:
    """Containers are PID namespaces (unshare --pid): root only; under CI a non-root run is a failure."""
    if os.geteuid() != 0:
        missing("a PID namespace (unshare --pid) needs root", "REQUIRE_ROOT")


def set_env(var: Path, port: int, **env: str) -> dict[str, str]:
    """The environment of a fresh set: this interpreter's programs first on PATH, no developer settings."""
    base = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
    bindir = str(Path(sys.executable).parent)
    return {**base, "PATH": bindir + os.pathsep + base.get("PATH", ""), "PORT": str(port),
            "VAR_DIR": str(var), "PYTHONUNBUFFERED": "1", **env}


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


def kubernetes_plan(grace: float = 3.0) -> tuple[Plan, float]:
    """deploy/kubernetes.yaml as a plan, with SHUTDOWN_GRACE_SECONDS lowered to ``grace``; and its drain."""
    units = []
    drain = 0.0
    for name, (command, env) in containers().items():
        env = {**env, "SHUTDOWN_GRACE_SECONDS": str(grace), "BIND_HOST": "127.0.0.1"}  # test: short, local
        env.pop("PORT")
        env.pop("VAR_DIR")
        period = float(env.get("SHUTDOWN_DRAIN_SECONDS", 0)) + grace + 2 + 3  # as the manifest derives it
        drain = max(drain, float(env.get("SHUTDOWN_DRAIN_SECONDS", 0)))
        units.append(Unit(name, tuple(command), Policy(signal_to=MAIN, timeout=period, kill_to=TREE), name,
                          pid1=True, env=env))
    return Plan("kubernetes", tuple(units), "SIGTERM to PID 1 of every container at once"), drain


class ManagedSet(AppClient):
    def __init__(self, the_plan: Plan, workdir: Path, *, port: int | None = None, directory: Path = ROOT,
                 **env: str) -> None:
        port = port or free_port()
        super().__init__(port, workdir / "var")
        self.plan = the_plan
        self.workdir = workdir
        self.env = set_env(self.var, port, **env)
        self.engine = Engine(the_plan, directory, self.env, log=workdir / f"{the_plan.manager}.log")
        self._rows: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, manager: str, workdir: Path, opts: Options | None = None, **env: str) -> ManagedSet:
        return cls(plan(manager, ROOT, PROCFILE, opts or Options(), workdir), workdir, **env)

    def start(self, names: list[str] | None = None, *, as_name: str | None = None) -> None:
        self.engine.start(names, as_name=as_name)

    def wait_ready(self, timeout: float = 60) -> None:
        """Every unit started and /readyz 200."""
        try:
            self.engine.wait_up(0.0, f"http://127.0.0.1:{self.port}/readyz", timeout)
        except Exception as e:  # noqa: BLE001 - the output says why
            raise AssertionError(f"{e}\n{self.output()}") from None

    def stop(self, names: list[str] | None = None) -> None:
        self.engine.stop(names)

    def finish(self, settle: float = 2.0) -> list[dict[str, Any]]:
        """After the stop: leftovers of the stopped units killed; one row per process
        (tools.stopcheck.report)."""
        self.engine.settle(settle)
        self._rows = report.rows(self.engine)
        return self._rows

    def output(self, name: str | None = None) -> str:
        return "\n".join(self.engine.output(name))

    def cleanup(self) -> None:
        self.engine.cleanup()


def assert_stopped_cleanly(ms: ManagedSet, rows: list[dict[str, Any]], units: list[str] | None = None,
                           exit_code: str = "0") -> None:
    """Nothing SIGKILLed, nothing left running, each unit's main process exited ``exit_code`` (honcho:
    143 after SIGTERM), and no process's stop overran."""
    out = ms.output()
    assert not ms.engine.timed_out, out
    killed = [(r["unit"], r["process"], r["killed_by"]) for r in rows if r["sigkilled"]]
    assert not killed, f"SIGKILLed: {killed}\n{out}"
    left = [(r["unit"], r["process"]) for r in rows if r["left_running"]]
    assert not left, f"left running: {left}\n{out}"
    mains = {r["unit"]: r for r in rows if r["main"]}
    for name in units or list(ms.engine.running):
        assert name in mains, (name, rows)
        assert mains[name]["exit"] == exit_code, (mains[name], out)
        assert mains[name]["signals"], mains[name]  # the manager's signal reached it
    assert "stop phase overran" not in out, out
    assert "sending SIGKILL" not in out, out
