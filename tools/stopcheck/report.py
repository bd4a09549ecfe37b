"""``scripts/shutdown-report DIR --manager NAME``: run a Procfile's set the way NAME does, stop it, report.

One row per process: the signals the manager sent it (with the disposition
it had for each, read from /proc just before), when it exited, its exit code
or the signal it died of, who SIGKILLed it, and whether it was still running
once the manager counted the set stopped (the report then kills it by pid).
With ``--url`` and ``--traffic S``, a request every 50 ms for S seconds after
the stop signal, as a load balancer that has not noticed yet.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tools.stopcheck.engine import Engine, NotReady
from tools.stopcheck.managers import KILL_MODES, MANAGERS, Options, Plan, plan
from tools.stopcheck.text import (
    decode_wait_status,
    describe_exit,
    format_table,
    short_command,
    shorten,
    signal_name,
)
from tools.stopcheck.traffic import Traffic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "managers", "Run the set as another manager or platform runs it (default: honcho start, as above). "
        "docker and kubernetes need root (each container is PID 1 of a PID namespace).")
    g.add_argument("--manager", choices=MANAGERS, default="honcho",
                   help="honcho: the default report. foreman: real `foreman start`. supervisord: "
                        "real supervisord (simulated if not installed). systemd: one simulated service "
                        "per entry (or --units). docker: each entry (or honcho, --pid1) PID 1 of its "
                        "container, SIGTERM to PID 1, SIGKILL after 10 s. kubernetes: each entry PID 1, "
                        "optional preStop sleep, SIGTERM, SIGKILL after terminationGracePeriodSeconds "
                        "(30). heroku: each entry alone, SIGTERM to every process of its dyno at once, "
                        "SIGKILL at 30 s")
    g.add_argument("--kill-after", type=float, metavar="S",
                   help="the manager's own SIGKILL delay: docker stop -t, terminationGracePeriodSeconds, "
                        "Heroku's 30 s, TimeoutStopSec, stopwaitsecs, foreman -t")
    g.add_argument("--pid1", choices=["entry", "honcho"], default="entry",
                   help="docker: each entry its own container (default), or honcho start as PID 1 of one")
    g.add_argument("--pre-stop", type=float, default=0.0, metavar="S", help="kubernetes: a preStop sleep")
    g.add_argument("--kill-mode", choices=KILL_MODES, default="control-group",
                   help="systemd: KillMode of the units made from the Procfile (default control-group)")
    g.add_argument("--units", type=Path, metavar="DIR",
                   help="systemd: simulate these *.service files (e.g. from `scripts/export systemd DIR`)")
    g.add_argument("--config", type=Path, metavar="FILE",
                   help="supervisord: include your [program:x] sections instead of supervisord's defaults")
    g.add_argument("--traffic", type=float, default=None, metavar="S",
                   help="with --url: a request every 50 ms for S seconds after the stop signal "
                        "(default 3 for kubernetes, else 0)")


def options(args: argparse.Namespace) -> Options:
    return Options(timeout=args.kill_after, pre_stop=args.pre_stop, kill_mode=args.kill_mode, pid1=args.pid1,
                   units_dir=args.units.resolve() if args.units else None,
                   config=args.config.resolve() if args.config else None, signal=args.signal,
                   report_timeout=args.timeout)


def rows(engine: Engine) -> list[dict[str, Any]]:
    t0 = engine.signal_at
    assert t0 is not None
    unit_of = engine._unit_of()
    runtime = {r.root for r in engine.running.values() if r.unit.pid1}
    left = {p.pid for p in engine.leftovers}
    procs = {p.pid: p for p in engine.tracker.history}  # the latest process of each pid
    out = []
    for proc in procs.values():
        name = unit_of.get(proc.pid)
        if name is None or proc.pid in runtime or (proc.exit_at is not None and proc.exit_at <= t0):
            continue
        run = engine.running[name]
        if proc.exit_status is None and proc.pid == run.root and run.popen.returncode is not None:
            rc = run.popen.returncode
            proc.exit_status = (-rc) & 0x7F if rc < 0 else (rc & 0xFF) << 8
            proc.exit_status_source = "popen"
        code, termsig = decode_wait_status(proc.exit_status) if proc.exit_status is not None else (None, None)
        sent = engine.describe_deliveries(proc.pid)
        depth, cur = 0, procs.get(proc.parent)
        while cur is not None and unit_of.get(cur.pid) == name and cur.pid not in runtime and depth < 64:
            depth, cur = depth + 1, procs.get(cur.parent)
        killer = ""
        if proc.pid in left:
            killer = "report"
        elif termsig == signal.SIGKILL:
            bys = [by for sig, _d, by, _t in sent if sig == "SIGKILL"]
            if bys:
                killer = "report" if "report" in bys else engine.plan.manager
            elif run.unit.pid1 and run.state.killed is not None:
                killer = engine.plan.manager  # the container was killed: the kernel took the rest
            elif run.unit.pid1 and proc.pid != run.main:
                killer = "kernel (PID 1 exited)"
            else:
                killer = "another process"
        received = [(s, d) for s, d, _by, _t in sent if not (s == "SIGKILL" and d == "-")]
        out.append({
            "unit": name, "entry": run.unit.entry, "pid": proc.pid, "parent": proc.parent, "depth": depth,
            "main": proc.pid == run.main,
            "process": shorten("  " * depth + short_command(proc.cmdline, 200), 40),
            "cmdline": proc.cmdline,
            "signals": [{"signal": s, "disposition": d, "by": by, "after_s": t} for s, d, by, t in sent],
            "signal_received": ", ".join(f"{s} ({d})" for s, d in received) or "none directly",
            "exit_after_s": None if proc.exit_at is None or proc.pid in left else round(proc.exit_at - t0, 3),
            "exit_code": code, "exit_signal": signal_name(termsig) if termsig else None,
            "exit": "-" if proc.pid in left else describe_exit(code, termsig),
            "sigkilled": bool(killer), "killed_by": killer, "left_running": proc.pid in left,
        })
    order = {u.name: i for i, u in enumerate(engine.plan.units)}
    out.sort(key=lambda r: (order.get(r["unit"], len(order)), r["unit"], r["depth"] > 0, r["pid"]))
    return out


def unit_summary(engine: Engine) -> list[dict[str, Any]]:
    t0 = engine.signal_at or 0.0

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 3)

    return [{"unit": name, "argv": list(r.unit.argv), "pid1": r.unit.pid1, "begun_s": rel(r.state.begun),
             "signalled_s": rel(r.state.signalled), "main_exit_s": rel(r.state.main_exit),
             "killed_s": rel(r.state.killed), "stopped_s": rel(r.state.done)}
            for name, r in engine.running.items()]


def render(engine: Engine, directory: Path, traffic: dict[str, int] | None) -> tuple[str, dict[str, Any]]:
    table_rows = rows(engine)
    p: Plan = engine.plan
    killed = [r for r in table_rows if r["sigkilled"] and not r["left_running"]]
    left = [r for r in table_rows if r["left_running"]]
    problems = []
    if engine.timed_out:
        problems.append("the manager did not finish its stop in time: the report killed what was left")
    if killed:
        problems.append(f"{len(killed)} SIGKILLed: " + ", ".join(f"{r['unit']} pid {r['pid']} (by "
                                                                 f"{r['killed_by']})" for r in killed))
    if left:
        problems.append(f"{len(left)} left running (killed by the report): "
                        + ", ".join(f"{r['unit']} pid {r['pid']}" for r in left))
    verdict = ("NOT clean: " + "; ".join(problems)) if problems else \
        f"clean: all {len(table_rows)} processes exited, none SIGKILLed, none left"
    exits = [r["exit_after_s"] for r in table_rows if r["exit_after_s"] is not None]
    last = max(exits) if exits else None
    units = unit_summary(engine)
    lines = [f"shutdown report: {directory} under {p.manager} ({len(units)} unit(s): "
             f"{', '.join(u['unit'] for u in units)})",
             f"stop:     {p.summary}",
             f"tree:     {len(table_rows)} processes; "
             + (f"the last exited {last:.2f} s after the stop signal" if last is not None else "none exited")]
    for note in p.notes:
        lines.append(f"note:     {note}")
    if traffic is not None:
        counted = ", ".join(f"{n} {k}" for k, n in sorted(traffic.items()))
        lines.append(f"traffic:  requests in the first seconds after the stop signal: {counted or 'none'}")
    lines += ["", format_table(
        ["unit", "pid", "process", "signal received", "exit s", "exit", "SIGKILLed", "left running"],
        [[r["unit"], str(r["pid"]), r["process"], r["signal_received"],
          "-" if r["exit_after_s"] is None else f"{r['exit_after_s']:.2f}", r["exit"],
          f"by {r['killed_by']}" if r["killed_by"] else "no", "yes" if r["left_running"] else "no"]
         for r in table_rows], right=[1, 4]), ""]
    lines += textwrap.wrap("signal received: what the manager sent that process, with its disposition just "
                           "before. Signals a process sends its own children (gunicorn to its workers, "
                           "Celery to its pool, honcho to its entries) are not listed.", 100)
    nonzero = [r for r in table_rows if r["exit"] not in ("0", "-") and not r["sigkilled"]]
    if nonzero:
        lines += textwrap.wrap("non-zero exits: " + ", ".join(f"{r['unit']} pid {r['pid']} {r['exit']}"
                                                               for r in nonzero), 100,
                               initial_indent="note:     ", subsequent_indent="          ")
    lines.append(verdict)
    data = {"directory": str(directory), "manager": p.manager, "summary": p.summary, "notes": list(p.notes),
            "units": units, "processes": table_rows, "traffic": traffic, "last_exit_after_s": last,
            "timed_out": engine.timed_out, "proc_connector": engine.connector_note == "",
            "clean": not problems, "verdict": verdict, "exit_code": 1 if problems else 0}
    return "\n".join(lines), data


def main(args: argparse.Namespace, directory: Path, entries: list[tuple[str, str]], workdir: Path) -> int:
    try:
        the_plan = plan(args.manager, directory, entries, options(args), workdir)
    except (ValueError, KeyError) as e:
        print(f"shutdown-report: {e}", file=sys.stderr)
        return 2
    engine = Engine(the_plan, directory, verbose=args.verbose, log=args.log,
                    proc_connector=not args.no_proc_connector)
    seconds = args.traffic if args.traffic is not None else (3.0 if args.manager == "kubernetes" else 0.0)
    traffic = None
    try:
        engine.start()
        try:
            engine.wait_up(args.up, args.url, args.ready_timeout)
        except NotReady as e:
            print(f"shutdown-report: could not run: {e}", file=sys.stderr)
            for line in engine.output()[-20:]:
                print(f"  {line}", file=sys.stderr)
            return 2
        load = Traffic([args.url]).start() if args.url and seconds > 0 else None
        engine.stop()
        if load is not None:
            remaining = (engine.signal_at or 0) + seconds - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)  # the load balancer's delay, not a wait for the set
            load.stop()
            traffic = dict(load.counts(since=engine.signal_at, until=(engine.signal_at or 0) + seconds))
        engine.settle(args.settle)
        engine.stop_observing()
        text, data = render(engine, directory, traffic)
    except KeyboardInterrupt:
        print("shutdown-report: interrupted; killing what it started", file=sys.stderr)
        return 130
    finally:
        engine.cleanup()
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return data["exit_code"]
