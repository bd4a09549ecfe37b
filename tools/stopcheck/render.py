"""The report of one stop under honcho: the text ``scripts/shutdown-report`` prints, and its JSON."""

from __future__ import annotations

import os
import textwrap
from typing import Any

from tools.stopcheck import analysis
from tools.stopcheck.proctrack import POLL_INTERVAL
from tools.stopcheck.session import Run
from tools.stopcheck.text import format_table, signal_name


def report(run: Run) -> tuple[str, dict[str, Any], int]:
    t0 = run.signal_at
    assert t0 is not None
    rows = analysis.rows(run)
    sigkilled = [r for r in rows if r["sigkilled"]]
    left = [r for r in rows if r["left_running"]]
    problems = []
    if run.timed_out:
        n = sum(1 for r in rows if r["killed_at_timeout"])
        problems.append(f"honcho did not exit within {run.args.timeout:g} s: the report SIGKILLed it "
                        f"and {max(0, n - 1)} other process(es)")
    if sigkilled:
        by_honcho = [r for r in sigkilled if r["killed_by_honcho"]]
        what = ", ".join(f"{r['entry']} pid {r['pid']}" for r in sigkilled)
        problems.append(f"{len(sigkilled)} SIGKILLed ({len(by_honcho)} by honcho): {what}")
    if left:
        what = ", ".join(f"{r['entry']} pid {r['pid']}" for r in left)
        problems.append(f"{len(left)} left running after honcho exited (killed by the report): {what}")
    if problems:
        verdict = "NOT clean: " + "; ".join(problems)
    else:
        verdict = f"clean: all {len(rows)} processes exited, none SIGKILLed, none left"
    exited = [r["exit_after_s"] for r in rows if r["exit_after_s"] is not None]
    last = max(exited) if exited else None
    honcho_exit = run.honcho.exit_at
    honcho_proc = run.tracker.current.get(run.tracker.honcho_pid or -1)
    if honcho_proc is not None and honcho_proc.exit_time_source == "proc connector":
        honcho_exit = honcho_proc.exit_at  # the kernel's time, not the next Popen poll
    honcho_after = None if honcho_exit is None else round(honcho_exit - t0, 3)
    rc = run.honcho_rc
    honcho_rc = "exit code unknown" if rc is None else (f"killed by {signal_name(-rc)}" if rc < 0
                                                         else f"exit code {rc}")
    source = ("exit codes and times from the Linux proc connector" if run.connector
              else f"exit times from polling every {POLL_INTERVAL * 1000:.0f} ms; exit codes from "
              f"honcho's 'stopped' lines and reaped orphans, '?' otherwise ({run.connector_note})")
    if run.tracker.connector_lost_events:
        source += " (some events were dropped; polling filled in)"
    nonzero = [r for r in rows if r["exit"] not in ("0", "-") and r["entry"] != "honcho"
               and not r["sigkilled"] and not r["killed_by_report"]]
    data = {
        "directory": str(run.directory),
        "entries": run.names,
        "signal": signal_name(run.signum),
        "broadcast": bool(run.args.broadcast),
        "method": run.method,
        "honcho": {"pid": run.tracker.honcho_pid, "exit_code": run.honcho_rc,
                   "exit_after_s": honcho_after, "timed_out": run.timed_out},
        "last_exit_after_s": last,
        "observation": {"proc_connector": run.connector is not None, "note": run.connector_note,
                        "subreaper": run.subreaper, "polls": run.tracker.polls, "source": source,
                        "report_cpu_s": round(sum(os.times()[:2]), 2)},
        "processes": rows,
        "clean": not problems,
        "verdict": verdict,
        "exit_code": 1 if problems else 0,
    }
    lines = [
        f"shutdown report: {run.directory} ({len(run.names)} "
        f"{'entry' if len(run.names) == 1 else 'entries'}: {', '.join(run.names)})",
        f"stop:     {run.method}",
        f"honcho:   {honcho_rc}, "
        + (f"{honcho_after:.2f} s after the signal" if honcho_after is not None else "exit time unknown")
        + (f" (it had not exited within {run.args.timeout:g} s)" if run.timed_out else ""),
        f"tree:     {len(rows)} processes; "
        + (f"the last exited {last:.2f} s after the signal" if last is not None else "none exited")
        + (f"; {len(left)} left running" if left else ""),
        f"observed: {source}",
        "",
        format_table(
            ["entry", "pid", "process", "signal received", "exit s", "exit", "SIGKILLed",
             "left running"],
            [[r["entry"], str(r["pid"]), r["process"], r["signal_received"],
              "-" if r["exit_after_s"] is None else f"{r['exit_after_s']:.2f}", r["exit"],
              sigkilled_by(r), "yes" if r["left_running"] else "no"]
             for r in rows],
            right=[1, 4]),
        "",
        "signal received: sent to the process by the tty (^C to its foreground group), the report,",
        "  or honcho (killpg of the entry's group, timed by its 'sending' line), with the disposition",
        "  read from /proc just before. Signals a parent sends its own children (gunicorn to its",
        "  workers, Celery to its pool) are not seen. exit: the code, or the signal it died of.",
        "SIGKILLed: by honcho (5 s after the first entry stopped), by the report (left running, or",
        "  honcho timed out), or yes (by another process, e.g. its parent).",
    ]
    if nonzero:
        lines.extend(textwrap.wrap(
            "non-zero exits: " + ", ".join(f"{r['entry']} pid {r['pid']} {r['exit']}" for r in nonzero),
            width=100, initial_indent="note:     ", subsequent_indent="          "))
    lines.append(verdict)
    return "\n".join(lines), data, data["exit_code"]



def sigkilled_by(row: dict[str, Any]) -> str:
    """The table's SIGKILLed column: "no", "by honcho", "by report" or "yes" (someone else)."""
    if row["killed_by_report"]:
        return "by report"
    if row["killed_by_honcho"]:
        return "by honcho"
    return "yes" if row["sigkilled"] else "no"

