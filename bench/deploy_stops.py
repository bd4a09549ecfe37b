"""Stop figures per process manager: this set (deploy/honcho templates) and the stock reference.

    .venv/bin/python -m bench.deploy_stops [--only project|reference]

For each stop command (supervisorctl stop all, supervisorctl shutdown,
SIGTERM to supervisord, foreman ^C, foreman SIGTERM): a busy set (6 jobs of
12 s, a long poll, a request stream: tests/workload.py; grace 3 s), the stop,
a restart on the same data, and: stop time (command to last process gone),
jobs lost or late (not succeeded 60 s after the restart), 5xx, requests
reset or cut short, SIGKILLs (supervisord's log, foreman's output), processes
left running. This set runs `scripts/export supervisord`; the reference
(bench/reference) runs `honcho export supervisord` as is, under a supervisord
whose PATH has the virtualenv and redis-server (as a user who started it
from an activated virtualenv). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import getpass
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import _redis_bin_dir
from tests.procset import ROOT, AppClient, ProcessSet, free_port
from tests.supervised import BIN, SERVICE_ENV, Supervisord, export, write_env
from tests.workload import Workload, wait_ready

REFERENCE = ROOT / "bench" / "reference"
JOBS, JOB_SECONDS = 6, 12


def _settings(kind: str, tmp: Path, port: int) -> dict[str, str]:
    common = {"PORT": str(port), "VAR_DIR": str(tmp / "var"), "WORKER_CONCURRENCY": str(JOBS)}
    if kind == "project":
        return {**common, "SHUTDOWN_GRACE_SECONDS": "3"}
    (tmp / "var").mkdir(parents=True, exist_ok=True)
    return {**common, "REDIS_PORT": str(free_port()), "WEB_CONCURRENCY": "2"}


def supervisord_case(kind: str, how: str, tmp: Path) -> dict[str, object]:
    port = free_port()
    env_file = write_env(tmp / "app.env", _settings(kind, tmp, port))
    if kind == "project":
        conf = export("supervisord", tmp / "export", env_file, log_dir=tmp / "log")[0]
    else:
        (tmp / "log").mkdir()
        subprocess.run([sys.executable, "-m", "honcho", "export", "-f", str(REFERENCE / "Procfile"),
                        "-d", str(REFERENCE), "-e", str(env_file), "-a", "ref", "-u", getpass.getuser(),
                        "-l", str(tmp / "log"), "supervisord", str(tmp / "export")],
                       check=True, capture_output=True, timeout=60)
        conf = tmp / "export" / "ref.conf"
    env = {**SERVICE_ENV, "PATH": f"{BIN}:{_redis_bin_dir()}:/usr/bin:/bin"}
    client = AppClient(port, tmp / "var")
    sv = Supervisord(tmp / "sv", conf, env=env)
    try:
        sv.start()
        sv.wait_running()
        wait_ready(client, path="/readyz" if kind == "project" else "/healthz")
        load = Workload(client, jobs=JOBS, job_seconds=JOB_SECONDS, reports_running=kind == "project")
        load.start()
        elapsed = sv.stop(how)
        outcomes = load.finish()
        left = len(sv.survivors(supervisord_too=how != "stop all"))
        kills = len(sv.kills())
        if how == "stop all":
            sv.ctl("start", "all")
        else:
            sv.cleanup()
            sv = Supervisord(tmp / "sv", conf, env=env)
            sv.start()
        sv.wait_running()
        wait_ready(client, path="/readyz" if kind == "project" else "/healthz")
        verdict = load.verdict(client, timeout=60)
        return _row(elapsed, outcomes, verdict, kills, left)
    finally:
        sv.cleanup()


def foreman_case(kind: str, how: str, tmp: Path) -> dict[str, object]:
    env_file = write_env(tmp / "empty.env", {})
    cwd = ROOT if kind == "project" else REFERENCE

    def make() -> ProcessSet:
        ps = ProcessSet(tmp, cwd=cwd, runs_honcho=True, command=[])
        ps.env.update({k: v for k, v in _settings(kind, tmp, ps.port).items() if k != "PORT"})
        if kind == "reference":
            ps.env["PATH"] = _redis_bin_dir() + ":" + ps.env["PATH"]
        ps.command = ["foreman", "start", "-f", str(cwd / "Procfile"), "-d", str(cwd),
                      "-e", str(env_file), "-p", str(ps.port)]
        return ps

    sets = [make()]
    try:
        ps = sets[0]
        ps.start()
        wait_ready(ps, path="/readyz" if kind == "project" else "/healthz")
        load = Workload(ps, jobs=JOBS, job_seconds=JOB_SECONDS, reports_running=kind == "project")
        load.start()
        _rc, elapsed = ps.stop_and_wait(how, timeout=60)
        outcomes = load.finish()
        kills = ps.output.count("SIGKILL")
        left = len(ps.survivors())
        again = make()
        again.env["REDIS_PORT"] = ps.env.get("REDIS_PORT", "")
        sets.append(again)
        again.start()
        wait_ready(again, path="/readyz" if kind == "project" else "/healthz")
        return _row(elapsed, outcomes, load.verdict(again, timeout=60), kills, left)
    finally:
        for each in sets:
            each.cleanup()


def _row(elapsed, outcomes, verdict, kills, left) -> dict[str, object]:  # noqa: ANN001
    return {"stop s": round(elapsed, 2), "lost or late": len(verdict.failed) + len(verdict.late),
            "of": verdict.accepted, "5xx": outcomes.server_errors, "reset/cut": outcomes.dropped,
            "long poll": outcomes.long_poll, "SIGKILL": kills, "left running": left}


CASES = [("supervisorctl stop all", supervisord_case, "stop all"),
         ("supervisorctl shutdown", supervisord_case, "shutdown"),
         ("SIGTERM to supervisord", supervisord_case, "sigterm"),
         ("foreman ^C", foreman_case, "ctrl_c"),
         ("foreman SIGTERM", foreman_case, "sigterm")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["project", "reference"])
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["project", "reference"]
    keys = ["stop s", "lost or late", "of", "5xx", "reset/cut", "long poll", "SIGKILL", "left running"]
    print("| stop | set | " + " | ".join(keys) + " |")
    print("|---|---|" + "---:|" * len(keys))
    for label, case, how in CASES:
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix="deploy-stops-") as tmp:
                try:
                    row = case(kind, how, Path(tmp))
                    cells = [str(row[k]) for k in keys]
                except Exception as e:  # a set that cannot even be measured says why
                    cells = [f"error: {str(e).splitlines()[0][:80]}"] + [""] * (len(keys) - 1)
            print(f"| {label} | {kind} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
