"""Stop figures per process manager and stop command, this set vs the stock reference (tools/bench/reference).

    .venv/bin/python -m tools.bench.deploy_stops [--only project|reference]
                                                 [--managers supervisord,docker,...] [--jsonl rows.jsonl]
    .venv/bin/python -m tools.bench.deploy_stops --render project.jsonl reference.jsonl   # one table

Each row: the set started by the manager, busy (tools/bench/stop_sets.py), stopped with the manager's own
command, then started again on the same data; the columns are described in tools/bench/stop_table.py. This
module runs the real managers: supervisord (this set: ``scripts/export supervisord``; the reference:
``honcho export supervisord`` as is, supervisord's PATH holding the virtualenv and redis-server, as a
user who started it from an activated virtualenv), foreman and honcho (in a pty, as from a terminal).
tools/bench/platform_stops.py runs the simulated ones (systemd, docker, kubernetes, heroku). Prints the
markdown table, row by row.

Whatever a stop leaves running is counted ("left"), then stopped by pid before the restart
(stop_sets.terminate): the reference's leftovers hold its web port and REDIS_PORT, so without that its
restart fails (redis-server "Address already in use": supervisord marks it FATAL, foreman stops the
new set at once, and the web never answers).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.procset import AppClient, ProcessSet, free_port
from tests.supervised import BIN, SERVICE_ENV, Supervisord, export, write_env
from tests.workload import wait_ready
from tools.bench.stop_sets import (
    REFERENCE,
    Window,
    busy,
    directory,
    health,
    reference_path,
    row,
    settings,
    terminate,
)
from tools.bench.stop_table import Row, error_row, ordered, render

STOP_CAP = 30.0  # a process still running this long after the stop command is "left"


def supervisord_case(kind: str, how: str, tmp: Path) -> Row:
    port = free_port()
    env_file = write_env(tmp / "app.env", {"PORT": str(port), **settings(kind, tmp / "var")})
    if kind == "project":
        conf = export("supervisord", tmp / "export", env_file, log_dir=tmp / "log")[0]
        path = f"{BIN}:/usr/bin:/bin"
    else:
        (tmp / "log").mkdir()
        subprocess.run([sys.executable, "-m", "honcho", "export", "-f", str(REFERENCE / "Procfile"),
                        "-d", str(REFERENCE), "-e", str(env_file), "-a", "ref", "-u", getpass.getuser(),
                        "-l", str(tmp / "log"), "supervisord", str(tmp / "export")],
                       check=True, capture_output=True, timeout=60)
        conf = tmp / "export" / "ref.conf"
        path = reference_path(tmp)
    env = {**SERVICE_ENV, "PATH": path}
    client = AppClient(port, tmp / "var")
    sv = Supervisord(tmp / "sv", conf, env=env)
    try:
        sv.start()
        sv.wait_running()
        load = busy(client, kind)
        window = Window(port)
        t0 = time.monotonic()
        elapsed = sv.stop(how, timeout=STOP_CAP)
        refused = window.result(t0)
        outcomes = load.finish()
        leftovers = sv.survivors(supervisord_too=how != "stop all")
        kills = len(sv.kills())
        terminate([p.pid for p in leftovers])
        if how == "stop all":
            sv.ctl("start", "all")
        else:
            sv.cleanup()
            sv = Supervisord(tmp / "sv", conf, env=env)
            sv.start()
        sv.wait_running()
        wait_ready(client, path=health(kind))
        return row("supervisord", {"stop all": "supervisorctl stop all", "shutdown": "supervisorctl shutdown",
                                   "sigterm": "SIGTERM to supervisord"}[how], kind,
                   stop_s=elapsed, outcomes=outcomes, verdict=load.verdict(client, timeout=60),
                   window=refused, sigkills=kills, left=len(leftovers))
    finally:
        sv.cleanup()


def terminal_case(manager: str, kind: str, how: str, tmp: Path) -> Row:
    """foreman or honcho started in a pty; ^C typed into it, or SIGTERM to the manager."""
    cwd = directory(kind)
    env_file = write_env(tmp / "empty.env", {})
    own = settings(kind, tmp / "var")

    def make() -> ProcessSet:
        ps = ProcessSet(tmp, cwd=cwd, runs_honcho=True, command=[])
        ps.env.update(own)
        if kind == "reference":
            ps.env["PATH"] = reference_path(tmp)
        if manager == "foreman":
            ps.command = ["foreman", "start", "-f", str(cwd / "Procfile"), "-d", str(cwd),
                          "-e", str(env_file), "-p", str(ps.port)]
        else:
            ps.command = [sys.executable, "-m", "honcho", "start", "--no-colour", "-f", str(cwd / "Procfile"),
                          "-d", str(cwd)]
        return ps

    sets = [make()]
    try:
        ps = sets[0]
        ps.start()
        load = busy(ps, kind)
        ps.snapshot()  # the whole tree, pool children included
        window = Window(ps.port)
        t0 = time.monotonic()
        _rc, elapsed = ps.stop_and_wait(how, timeout=60)
        refused = window.result(t0)
        outcomes = load.finish()
        system = [line for line in ps.output.splitlines() if "SIGKILL" in line and "system" in line]
        leftovers = ps.survivors()
        terminate([p.pid for p in leftovers])
        again = make()
        sets.append(again)
        again.start()
        wait_ready(again, path=health(kind))
        return row(manager, "^C (pty)" if how == "ctrl_c" else f"SIGTERM to {manager}", kind,
                   stop_s=elapsed, outcomes=outcomes, verdict=load.verdict(again, timeout=60), window=refused,
                   sigkills="yes" if system else 0, left=len(leftovers))
    finally:
        for each in sets:
            each.cleanup()


def cases() -> list[tuple[str, str, object]]:
    """(manager, label, function of (kind, tmp) -> Row), in table order."""
    from tools.bench import platform_stops

    out: list[tuple[str, str, object]] = []
    for how, label in [("stop all", "supervisorctl stop all"), ("shutdown", "supervisorctl shutdown"),
                       ("sigterm", "SIGTERM to supervisord")]:
        out.append(("supervisord", label, lambda k, t, h=how: supervisord_case(k, h, t)))
    for manager in ("foreman", "honcho"):
        for how, label in [("ctrl_c", "^C (pty)"), ("sigterm", f"SIGTERM to {manager}")]:
            out.append((manager, label, lambda k, t, m=manager, h=how: terminal_case(m, k, h, t)))
    return out + platform_stops.cases()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["project", "reference"])
    parser.add_argument("--managers", help="comma-separated: supervisord,foreman,honcho,systemd,docker,...")
    parser.add_argument("--jsonl", type=Path, help="append each row to this file (JSON lines)")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSONL",
                        help="only print the table of rows saved with --jsonl (e.g. two runs' files)")
    args = parser.parse_args()
    if args.render:
        saved = [Row(**json.loads(line)) for f in args.render for line in f.read_text().splitlines()]
        print(render(ordered(saved)))
        return
    kinds = [args.only] if args.only else ["project", "reference"]
    wanted = set(args.managers.split(",")) if args.managers else None
    rows: list[Row] = []
    for manager, label, case in cases():
        if wanted and manager not in wanted:
            continue
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix="deploy-stops-") as tmp:
                try:
                    result = case(kind, Path(tmp))  # type: ignore[operator]
                    if result is None:  # a row for the other set only
                        continue
                except Exception as e:  # noqa: BLE001 - a row that cannot be measured says why
                    result = error_row(manager, label, kind, e)
            rows.append(result)
            if args.jsonl:
                with args.jsonl.open("a") as out:
                    out.write(json.dumps(dataclasses.asdict(result)) + "\n")
            print(render([result]).splitlines()[-1] if not result.note else render([result]), flush=True)
    print()
    print(render(rows))


if __name__ == "__main__":
    main()
