"""Start a Procfile's process set under ``honcho start``, stop it, and report how each process stopped.

Usage: ``scripts/shutdown-report DIR [options]`` (``--help`` lists them).

The set runs under honcho in a pseudo-terminal. Once it is up (every entry
started and old enough, or a URL answers 2xx), the report stops it the way a
user or a platform would: ``^C`` typed into honcho's terminal (``--signal
INT``), SIGTERM to honcho (``--signal TERM``), or the signal to every process
of the tree at once (``--broadcast``, like systemd's control-group kill or
Heroku). It then prints one row per process: the signal it received, when it
exited, its exit code, whether honcho had to SIGKILL it, and whether it was
still running after honcho exited (those are then killed by pid).

How it observes (stdlib and psutil only):

- the report is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so processes
  that daemonise or are orphaned are reparented to it and stay in its tree;
- the tree is polled every 20 ms from ``/proc``: parent, process group,
  session, command line and signal dispositions (``SigIgn``/``SigCgt``);
- the Linux proc connector (netlink; before Linux 6.6 only for root) reports
  every fork, exec and exit with the exit status and a kernel timestamp.
  Without it, exit times come from polling, and exit codes from honcho's
  ``stopped (rc=N)`` lines and from orphans the report reaps itself;
- honcho's own lines (``started``, ``sending SIGTERM``, ``sending SIGKILL``,
  ``stopped``) tell which process group got which signal when.

Exit status: 0 clean, 1 something was SIGKILLed or left running (or honcho
did not exit in time), 2 the report could not run (no Procfile, bad
arguments, the set did not come up).

The parts: tools.stopcheck.honcho (honcho in a pty), tools.stopcheck.proctrack (/proc,
the tree), tools.stopcheck.connector (the proc connector), tools.stopcheck.session (the
stop), tools.stopcheck.analysis (a row per process), tools.stopcheck.render (text and
JSON); ``--manager NAME``: tools.stopcheck.report. This module: the arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tools.stopcheck.report
from tools.stopcheck import render
from tools.stopcheck.session import NotReady, Run, wait_ready
from tools.stopcheck.text import parse_procfile


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shutdown-report",
        description="Start DIR/Procfile under honcho, stop it with a signal, and report how every process "
                    "stopped: signal received, time to exit, exit code, SIGKILLed by honcho, left running.",
        epilog="Exit status: 0 clean; 1 something was SIGKILLed or left running, or honcho did not exit "
               "in time; 2 could not run. The environment is passed to honcho (set PORT etc.).")
    p.add_argument("dir", help="directory holding the Procfile (relative to the current directory)")
    p.add_argument("--signal", choices=["INT", "TERM"], default="INT", type=str.upper,
                   help="INT (default): ^C typed into honcho's terminal, as a user; TERM: SIGTERM to honcho, "
                        "as a platform")
    p.add_argument("--broadcast", action="store_true",
                   help="send the signal to every process of the tree at once (systemd, Heroku)")
    p.add_argument("--up", type=float, default=None, metavar="SECONDS",
                   help="ready when every entry has started and the youngest is this old (default 3; "
                        "with --url, 0 unless given)")
    p.add_argument("--url", help="ready when this URL answers HTTP 2xx")
    p.add_argument("--ready-line", action="append", default=[], metavar="ENTRY=REGEX",
                   help="ready when ENTRY has printed a line matching REGEX (e.g. 'worker=ready\\.$'); "
                        "repeatable; honcho only")
    p.add_argument("--ready-timeout", type=float, default=60, metavar="S",
                   help="exit 2 if the set is not ready after S seconds (default 60)")
    p.add_argument("--timeout", type=float, default=30, metavar="S",
                   help="SIGKILL honcho and its tree if it has not exited this long after the signal (30)")
    p.add_argument("--settle", type=float, default=2, metavar="S",
                   help="after honcho exits, wait this long for the rest of the tree (default 2)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    p.add_argument("--log", type=Path, metavar="FILE", help="write honcho's output to FILE")
    p.add_argument("--verbose", action="store_true", help="echo honcho's output to stderr")
    p.add_argument("--no-proc-connector", action="store_true",
                   help="observe by polling only (what a non-root user gets before Linux 6.6)")
    tools.stopcheck.report.add_arguments(p)
    args = p.parse_args(argv)
    args.ready_lines = []
    for spec in args.ready_line:
        entry, sep, pattern = spec.partition("=")
        if not sep or not entry:
            p.error(f"--ready-line {spec!r}: expected ENTRY=REGEX")
        try:
            args.ready_lines.append((entry, re.compile(pattern)))
        except re.error as e:
            p.error(f"--ready-line {spec!r}: {e}")
    if args.ready_lines and args.manager != "honcho":
        p.error("--ready-line works with honcho only")
    if args.up is None:
        args.up = 0.0 if args.url else 3.0
    for name in ("up", "ready_timeout", "timeout", "settle"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    caller = os.environ.pop("SHUTDOWN_REPORT_CWD", None)  # set by scripts/shutdown-report
    if caller:
        os.chdir(caller)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    directory = Path(args.dir).resolve()
    procfile = directory / "Procfile"
    if not procfile.is_file():
        print(f"shutdown-report: no Procfile in {directory}", file=sys.stderr)
        return 2
    entries = parse_procfile(procfile.read_text())
    if not entries:
        print(f"shutdown-report: {procfile} has no entries", file=sys.stderr)
        return 2
    unknown = sorted({entry for entry, _ in args.ready_lines} - {name for name, _ in entries})
    if unknown:
        print(f"shutdown-report: --ready-line for {', '.join(unknown)}: not in {procfile}", file=sys.stderr)
        return 2
    if args.manager != "honcho":  # another manager's stop, simulated or real: tools/stopcheck/report.py
        with tempfile.TemporaryDirectory(prefix="shutdown-report-") as workdir:
            return tools.stopcheck.report.main(args, directory, entries, Path(workdir))

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    run = Run(args, directory, entries)
    try:
        run.start()
        try:
            wait_ready(args, run.honcho, run.names)
        except NotReady as e:
            run.abort()
            run.stop_observing()
            print(f"shutdown-report: could not run: {e}", file=sys.stderr)
            if e.entry:
                own = run.honcho.tail(10, e.entry)
                print(f"last lines of {e.entry}:", file=sys.stderr)
                for line in own or ["(none)"]:
                    print(f"  {line}", file=sys.stderr)
            print("last lines of output:", file=sys.stderr)
            for line in run.honcho.tail(20):
                print(f"  {line}", file=sys.stderr)
            if run.leftovers:
                print(f"(killed {len(run.leftovers)} process(es) still running afterwards)", file=sys.stderr)
            return 2
        run.send_stop()
        run.wait_stop()
        run.stop_observing()
        text, data, code = render.report(run)
    except KeyboardInterrupt:
        print("shutdown-report: interrupted; killing what it started", file=sys.stderr)
        return 130
    finally:
        run.cleanup()
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
