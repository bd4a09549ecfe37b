"""Stop figures under the simulated managers and platforms (stopcheck's engine, tests/managed.py).

Rows for tools/bench/deploy_stops.py (run that module): systemd, docker, kubernetes and heroku, each for this
set and for the stock reference, busy (tools/bench/stop_sets.py). The engine starts each unit in its own
session (a container: PID 1 of its own PID namespace, root only), sends the manager's signals by its
policy, and records how every process ended (tools.stopcheck.report rows). The set is then started again
by the same manager (new units: containers, dynos, services) on the same data, and every job accepted
is checked 60 s later.

- systemd, this set: the units of ``scripts/export systemd`` (KillMode=mixed, broker stopped last).
  The reference: one unit per Procfile line, in ``sh -c``, KillMode=process as ``honcho export systemd``
  (honcho 2.0) writes it, and KillMode=control-group (systemd's default, the README's old advice).
- docker: honcho as PID 1 of one container, or each entry as PID 1 of its own; SIGKILL at 10 s.
- kubernetes: this set: deploy/kubernetes.yaml's containers with its drain (grace lowered to 3 s and
  terminationGracePeriodSeconds derived the same way, as tests/e2e/test_kubernetes_stop.py does); the
  reference: its Procfile lines as PID 1, no drain, 30 s. Both on an external Redis.
- heroku: a dyno per entry, SIGTERM to the whole tree, SIGKILL at 30 s; this set with grace 25. Both on
  an external Redis (a Redis dyno cannot serve other dynos).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.managed import PROCFILE, ManagedSet, kubernetes_plan
from tests.procset import free_port
from tests.servers import RedisServer
from tests.supervised import export, write_env
from tools.bench import stop_sets as sets
from tools.bench.stop_sets import (
    GRACE,
    REF_PROCFILE,
    Window,
    busy,
    directory,
    health,
    row,
    settings,
    terminate,
)
from tools.bench.stop_table import Row
from tools.stopcheck.managers import Options, Plan, plan

SHELL_PATH_NOTE = ("units made from the Procfile, each line in `sh -c` with the caller's PATH: the "
                   "`ExecStart=/bin/sh -lc '...'` that `honcho export systemd` writes runs a login shell, "
                   "whose /etc/profile resets PATH, so the virtualenv's gunicorn and celery are not found")


def engine_case(manager: str, stop: str, kind: str, tmp: Path, the_plan: Plan, env: dict[str, str], *,
                port: int | None = None, note: str = "") -> Row:
    """Start the plan's units, make them busy, stop them the manager's way, restart, count."""
    ms = ManagedSet(the_plan, tmp, port=port, directory=directory(kind), **env)
    url = f"http://127.0.0.1:{ms.port}{health(kind)}"
    try:
        ms.start()
        ms.engine.wait_up(1.0, url, 90)
        load = busy(ms, kind)
        window = Window(ms.port)
        ms.stop()
        assert ms.engine.signal_at is not None
        refused = window.result(ms.engine.signal_at)
        stopped = {u.name for u in the_plan.units}
        deadline = time.monotonic() + 2  # as the engine's settle: still running 2 s after the stop is left
        while ms.engine.ours(stopped) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = ms.engine.ours(stopped)
        terminate([p.pid for p in leftovers])
        rows = ms.finish(settle=0.5)
        outcomes = load.finish()
        kills = sum(1 for r in rows if r["sigkilled"] and not r["left_running"])
        left = len(leftovers) + sum(1 for r in rows if r["left_running"])
        exits = [r["exit_after_s"] for r in rows if r["exit_after_s"] is not None]
        for unit in the_plan.units:  # the same manager starts the set again: new containers, dynos
            ms.start([unit.name], as_name=f"{unit.name}-again")
        ms.engine.wait_up(1.0, url, 90)
        verdict = load.verdict(ms, timeout=60)
        return row(manager, stop, kind, stop_s=max(exits, default=0.0), outcomes=outcomes, verdict=verdict,
                   window=refused, sigkills=kills, left=left, note=note)
    finally:
        ms.cleanup()


def own_env(kind: str, tmp: Path, grace: int = GRACE, **extra: str) -> dict[str, str]:
    env = settings(kind, tmp / "var", grace=grace)
    if kind == "reference":
        env["PATH"] = sets.reference_path(tmp)
    return {**env, **extra}


def systemd_case(kind: str, tmp: Path, kill_mode: str = "process") -> Row:
    if kind == "project":
        port = free_port()
        env_file = write_env(tmp / "app.env", {**settings(kind, tmp / "var"), "PYTHONUNBUFFERED": "1"})
        units = tmp / "units"
        export("systemd", units, env_file, app="app", extra=("-p", str(port)))
        the_plan = plan("systemd", directory(kind), PROCFILE, Options(units_dir=units))
        return engine_case("systemd", "systemctl stop APP.target", kind, tmp, the_plan, {}, port=port)
    the_plan = plan("systemd", directory(kind), REF_PROCFILE, Options(kill_mode=kill_mode))
    return engine_case("systemd", f"systemctl stop (KillMode={kill_mode})", kind, tmp, the_plan,
                       own_env(kind, tmp), note=SHELL_PATH_NOTE)


def docker_case(kind: str, tmp: Path, pid1: str) -> Row:
    entries = PROCFILE if kind == "project" else REF_PROCFILE
    the_plan = plan("docker", directory(kind), entries, Options(pid1=pid1, timeout=10))
    stop = "docker stop, honcho PID 1" if pid1 == "honcho" else "docker stop, each entry PID 1"
    shells = [n.split(":")[0] for n in the_plan.notes]
    note = f"shell form, `/bin/sh -c` as PID 1: {', '.join(shells)}" if pid1 == "entry" and shells else ""
    return engine_case("docker", stop, kind, tmp, the_plan, own_env(kind, tmp), note=note)


def _with_external_redis(kind: str, tmp: Path, make: Callable[[dict[str, str]], Row]) -> Row:
    server = RedisServer(tmp / "external-redis")
    try:
        server.start()
        extra = {"REDIS_URL": server.url} if kind == "project" else {"REDIS_PORT": str(server.port)}
        return make(extra)
    finally:
        server.stop()


def kubernetes_case(kind: str, tmp: Path) -> Row:
    def make(extra: dict[str, str]) -> Row:
        if kind == "project":
            the_plan, drain = kubernetes_plan(3.0)  # the manifest, grace 3 s
            env = own_env(kind, tmp, **extra)
            note = f"deploy/kubernetes.yaml, SHUTDOWN_DRAIN_SECONDS={drain:g}"
        else:
            entries = [(n, c) for n, c in REF_PROCFILE if n != "redis"]
            the_plan = plan("kubernetes", directory(kind), entries, Options())
            env = own_env(kind, tmp, **extra)
            shells = ", ".join(n.split(":")[0] for n in the_plan.notes)
            note = (f"Procfile lines web, worker, beat as PID 1 (shell form, `/bin/sh -c`: {shells}); "
                    "terminationGracePeriodSeconds 30, no preStop, no drain")
        return engine_case("kubernetes", "pod deleted (SIGTERM to PID 1)", kind, tmp, the_plan, env,
                           note=note)

    return _with_external_redis(kind, tmp, make)


def heroku_case(kind: str, tmp: Path) -> Row:
    def make(extra: dict[str, str]) -> Row:
        entries = PROCFILE if kind == "project" else [(n, c) for n, c in REF_PROCFILE if n != "redis"]
        the_plan = plan("heroku", directory(kind), entries, Options())
        env = own_env(kind, tmp, grace=25, **extra)
        note = "SHUTDOWN_GRACE_SECONDS=25" if kind == "project" else ""
        return engine_case("heroku", "dyno stop (SIGTERM to all)", kind, tmp, the_plan, env, note=note)

    return _with_external_redis(kind, tmp, make)


def cases() -> list[tuple[str, str, object]]:
    return [
        ("systemd", "systemctl stop", systemd_case),
        ("systemd", "systemctl stop (KillMode=control-group)",
         lambda k, t: systemd_case(k, t, "control-group") if k == "reference" else None),
        ("docker", "docker stop, honcho PID 1", lambda k, t: docker_case(k, t, "honcho")),
        ("docker", "docker stop, each entry PID 1", lambda k, t: docker_case(k, t, "entry")),
        ("kubernetes", "pod deleted", kubernetes_case),
        ("heroku", "dyno stop", heroku_case),
    ]
