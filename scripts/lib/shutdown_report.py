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
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import stopcheck.report
from stopcheck.observe import (  # noqa: F401 - the unit tests read some of them from here
    CN_IDX_PROC,
    CN_MSG_HDR,
    CN_VAL_PROC,
    EVENT_HDR,
    FULL_SCAN_EVERY,
    NLMSG_HDR,
    POLL_INTERVAL,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_NONE,
    Proc,
    ProcConnector,
    Tracker,
    open_proc_connector,
    parse_proc_events,
    read_masks,
    read_stat,
    set_child_subreaper,
)
from stopcheck.text import (  # noqa: F401
    decode_wait_status,
    describe_exit,
    describe_signals,
    disposition,
    format_table,
    parse_procfile,
    parse_status_masks,
    short_command,
    shorten,
    signal_name,
    signal_number,
)
from stopcheck.traffic import url_answers

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
HONCHO_PREFIX = re.compile(r"^\d\d:\d\d:\d\d (?P<name>\S+)\s*\| ?(?P<text>.*)$")
STARTED = re.compile(r"^(?P<name>[\w.-]+) started \(pid=(?P<pid>\d+)\)$")
SENDING = re.compile(r"^sending (?P<sig>SIG[A-Z0-9]+) to (?P<name>[\w.-]+) \(pid (?P<pid>\d+)\)$")
STOPPED = re.compile(r"^(?P<name>[\w.-]+) stopped \(rc=(?P<rc>-?\d+|None)\)$")
RECEIVED = re.compile(r"^(?P<sig>SIG[A-Z0-9]+) received$")

# --------------------------------------------------------------------------
# Pure helpers: parsing and formatting (unit-tested)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HonchoEvent:
    kind: str  # "started", "sending", "stopped" or "received"
    name: str = ""  # honcho's process name, e.g. "web.1"
    pid: int | None = None
    rc: int | None = None
    signal: str = ""  # "SIGTERM", "SIGKILL", "SIGINT"


def clean_line(line: str) -> str:
    """A line of honcho's terminal output without colours, CR, or the tty's echoed ``^C``."""
    line = ANSI.sub("", line).replace("\r", "")
    while line.startswith("^C"):
        line = line[2:]
    return line


def parse_honcho_line(line: str) -> HonchoEvent | None:
    """honcho's own ``system`` lines as events; anything else (a program's output) is None.

    Accepts the full ``HH:MM:SS system | text`` form or the bare text.
    """
    line = clean_line(line).strip()
    m = HONCHO_PREFIX.match(line)
    if m:
        if m["name"] != "system":
            return None
        line = m["text"].strip()
    if m := STARTED.match(line):
        return HonchoEvent("started", m["name"], pid=int(m["pid"]))
    if m := SENDING.match(line):
        return HonchoEvent("sending", m["name"], pid=int(m["pid"]), signal=m["sig"])
    if m := STOPPED.match(line):
        rc = None if m["rc"] == "None" else int(m["rc"])
        return HonchoEvent("stopped", m["name"], rc=rc)
    if m := RECEIVED.match(line):
        return HonchoEvent("received", signal=m["sig"])
    return None



# --------------------------------------------------------------------------
# honcho in a pseudo-terminal
# --------------------------------------------------------------------------


def _controlling_tty() -> None:
    """In the child: the pty becomes honcho's terminal, with a fresh terminal's signal dispositions.

    Ignored signals survive exec: started from ``nohup`` or a script's
    background job, honcho and every program would inherit SIGHUP or SIGINT
    ignored, and the report would describe that instead of the set.
    """
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Honcho:
    def __init__(self, directory: Path, procfile: Path, *, verbose: bool, log: Path | None) -> None:
        self.directory = directory
        self.procfile = procfile
        self.verbose = verbose
        self.log = open(log, "w", encoding="utf-8") if log else None  # noqa: SIM115
        self.lines: list[tuple[float, str]] = []
        self.events: list[tuple[float, HonchoEvent]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.master: int | None = None
        self.exit_at: float | None = None
        self._partial = ""
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        master, slave = pty.openpty()
        command = [sys.executable, "-m", "honcho", "start", "--no-colour",
                   "-f", str(self.procfile), "-d", str(self.directory)]
        try:
            self.proc = subprocess.Popen(command, cwd=self.directory, stdin=slave, stdout=slave,
                                         stderr=slave, start_new_session=True,
                                         preexec_fn=_controlling_tty, close_fds=True)
        finally:
            os.close(slave)
        self.master = master
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.monotonic()
            text = self._partial + chunk.decode(errors="replace")
            *complete, self._partial = text.split("\n")
            for raw in complete:
                self._line(now, raw)
        if self._partial:
            self._line(time.monotonic(), self._partial)
            self._partial = ""

    def _line(self, now: float, raw: str) -> None:
        line = clean_line(raw)
        event = parse_honcho_line(line)
        with self._lock:
            self.lines.append((now, line))
            if event is not None:
                self.events.append((now, event))
        if self.verbose:
            print(line, file=sys.stderr, flush=True)
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def poll(self) -> int | None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None and self.exit_at is None:
            self.exit_at = time.monotonic()
        return rc

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.poll()
            if rc is not None:
                return rc
            time.sleep(0.01)
        return self.poll()

    def events_of(self, kind: str) -> list[tuple[float, HonchoEvent]]:
        with self._lock:
            return [(t, e) for t, e in self.events if e.kind == kind]

    def tail(self, n: int = 20, name: str | None = None) -> list[str]:
        """The last n lines of output, or of one process's output (honcho's name, e.g. ``web.1``)."""
        with self._lock:
            lines = [line for _, line in self.lines]
        if name is not None:
            lines = [line for line in lines if (m := HONCHO_PREFIX.match(line)) and m["name"] == name]
        return lines[-n:]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.join(0.5)
        if self.master is not None:
            os.close(self.master)
            self.master = None
        if self.log:
            self.log.close()
            self.log = None


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


class NotReady(Exception):
    def __init__(self, message: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.entry = entry  # honcho's name of the entry that stopped, if one did


@dataclass
class Delivery:
    """A signal sent to a set of processes: by the tty, by the report, or by honcho."""

    at: float
    signum: int
    source: str  # "tty", "report", "honcho"
    pgid: int | None = None  # every process of this group at that time
    pids: frozenset[int] = frozenset()  # or these processes
    exact: bool = True  # False: timed by honcho's line, not by the kill itself


def proc_age(pid: int) -> float | None:
    try:
        import psutil

        return time.time() - psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or no access: not ready yet
        return None


def wait_ready(args: argparse.Namespace, honcho: Honcho, names: list[str]) -> None:
    deadline = time.monotonic() + args.ready_timeout
    expected = {f"{n}.1" for n in names}
    last_url_check = 0.0
    while True:
        rc = honcho.poll()
        if rc is not None:
            raise NotReady(f"honcho exited with code {rc} before the set was ready")
        stopped = honcho.events_of("stopped")
        if stopped:
            e = stopped[0][1]
            raise NotReady(f"{e.name} stopped (rc={e.rc}) before the set was ready", e.name)
        started = {e.name: e.pid for _, e in honcho.events_of("started")}
        ready = expected <= set(started)
        if ready and args.up:
            ages = [proc_age(pid) for name, pid in started.items() if name in expected and pid]
            ready = all(a is not None and a >= args.up for a in ages)
        if ready and args.url:
            if time.monotonic() - last_url_check >= 0.2:
                last_url_check = time.monotonic()
                ready = url_answers(args.url)
            else:
                ready = False
        if ready:
            return
        if time.monotonic() > deadline:
            what = f"{args.url} did not answer 2xx" if args.url else "not every entry was up"
            raise NotReady(f"not ready within {args.ready_timeout:g} s: {what}")
        time.sleep(0.05)


class Run:
    def __init__(self, args: argparse.Namespace, directory: Path, entries: list[tuple[str, str]]) -> None:
        self.args = args
        self.directory = directory
        self.entries = entries
        self.names = [n for n, _ in entries]
        self.signum = signal.SIGINT if args.signal == "INT" else signal.SIGTERM
        self.tracker = Tracker()
        self.subreaper = set_child_subreaper()
        self.connector: ProcConnector | None = None
        self.connector_note = "disabled by --no-proc-connector"
        if not args.no_proc_connector:
            self.connector, self.connector_note = open_proc_connector()
        self.honcho = Honcho(directory, directory / "Procfile", verbose=args.verbose, log=args.log)
        self.stop_threads = threading.Event()
        self.threads: list[threading.Thread] = []
        self.deliveries: list[Delivery] = []
        self.signal_at: float | None = None
        self.method = ""
        self.timed_out = False
        self.honcho_rc: int | None = None
        self.leftovers: list[Proc] = []

    # -- threads ---------------------------------------------------------------
    def _poller(self) -> None:
        every = FULL_SCAN_EVERY if self.connector else 1
        n = 0
        while not self.stop_threads.is_set():
            self.tracker.poll(full=n % every == 0 or self.tracker.connector_lost_events)
            n += 1
            self.stop_threads.wait(POLL_INTERVAL)

    def start(self) -> None:
        if self.connector:
            t = threading.Thread(target=self.connector.run, args=(self.tracker, self.stop_threads),
                                 daemon=True)
            t.start()
            self.threads.append(t)
        self.honcho.start()
        assert self.honcho.proc is not None
        self.tracker.honcho_pid = self.honcho.proc.pid
        with self.tracker.lock:
            if self.honcho.proc.pid not in self.tracker.current:
                self.tracker._add(Proc(self.honcho.proc.pid, os.getpid(), time.monotonic(), forked=False))
        t = threading.Thread(target=self._poller, daemon=True)
        t.start()
        self.threads.append(t)

    def stop_observing(self) -> None:
        time.sleep(0.05)  # exit events already sent by the kernel reach the connector thread
        self.stop_threads.set()
        for t in self.threads:
            t.join(2)
        if self.connector:
            self.connector.close()

    # -- the stop ----------------------------------------------------------------
    def send_stop(self) -> None:
        honcho = self.honcho
        assert honcho.proc is not None and honcho.master is not None
        self.tracker.poll(full=True)  # dispositions and groups just before the signal
        name = signal_name(self.signum)
        if self.args.broadcast:
            targets = [p for p in self.tracker.alive()]
            self.signal_at = time.monotonic()
            sent = []
            for p in sorted(targets, key=lambda p: p.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, self.signum)
                    sent.append(p.pid)
            self.deliveries.append(Delivery(self.signal_at, self.signum, "report", pids=frozenset(sent)))
            self.method = f"{name} sent by the report to every process of the tree at once ({len(sent)})"
        elif self.signum == signal.SIGINT:
            foreground = os.tcgetpgrp(honcho.master)
            self.signal_at = time.monotonic()
            os.write(honcho.master, b"\x03")
            self.deliveries.append(Delivery(self.signal_at, self.signum, "tty", pgid=foreground))
            self.method = f"SIGINT as ^C typed into honcho's terminal (foreground process group {foreground})"
        else:
            self.signal_at = time.monotonic()
            honcho.proc.send_signal(self.signum)
            self.deliveries.append(Delivery(self.signal_at, self.signum, "report",
                                            pids=frozenset({honcho.proc.pid})))
            self.method = f"SIGTERM sent to honcho (pid {honcho.proc.pid})"

    def wait_stop(self) -> None:
        honcho = self.honcho
        assert honcho.proc is not None
        rc = honcho.wait(self.args.timeout)
        if rc is None:
            self.timed_out = True
            self.tracker.kill(self.tracker.alive())  # honcho and its whole tree at once, by pid
            if honcho.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    honcho.proc.kill()
            rc = honcho.wait(5)
        self.honcho_rc = rc
        # The tree drains: processes that outlive honcho are leftovers after --settle.
        deadline = time.monotonic() + self.args.settle
        while self.tracker.alive() and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        self.tracker.poll(full=True)
        self.leftovers = [p for p in self.tracker.alive() if p.pid != self.tracker.honcho_pid]
        if self.leftovers:
            self.tracker.kill(self.leftovers)
        self.drain(5)

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tracker.reap_all()
            if not self.tracker.alive():
                break
            time.sleep(POLL_INTERVAL)
        self.tracker.poll(full=True)
        self.tracker.reap_all()

    def abort(self) -> None:
        """The set did not come up (or the report was interrupted): stop it, then kill what is left."""
        honcho = self.honcho
        if honcho.proc is not None and honcho.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                honcho.proc.send_signal(signal.SIGTERM)
            if honcho.wait(min(self.args.timeout, 10)) is None:
                with contextlib.suppress(ProcessLookupError):
                    honcho.proc.kill()
                honcho.wait(5)
        deadline = time.monotonic() + min(self.args.settle, 2)
        while self.tracker.alive() and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        self.leftovers = self.tracker.alive()
        self.tracker.kill(self.leftovers)
        self.drain(5)

    def cleanup(self) -> None:
        """Whatever happened: nothing the report started stays running."""
        with contextlib.suppress(Exception):
            self.tracker.poll(full=True)
        self.tracker.kill(self.tracker.alive())
        if self.honcho.proc is not None and self.honcho.proc.poll() is None:
            self.honcho.proc.kill()
            self.honcho.proc.wait(5)
        self.tracker.reap_all()
        self.honcho.close()

    # -- the report -----------------------------------------------------------------
    def honcho_deliveries(self) -> None:
        for t, e in self.honcho.events_of("sending"):
            if e.pid is not None:
                self.deliveries.append(Delivery(t, signal_number(e.signal), "honcho", pgid=e.pid,
                                                exact=False))
        self.deliveries.sort(key=lambda d: d.at)

    def entry_of(self) -> tuple[dict[int, str], dict[int, int], dict[int, str]]:
        """For each relevant pid: its entry name, its depth under the entry, and a label for helpers."""
        tracker = self.tracker
        started = {e.name: e.pid for _, e in self.honcho.events_of("started") if e.pid}
        entry_pids = {pid: name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1] == "1" else name
                      for name, pid in started.items()}
        honcho_pid = tracker.honcho_pid
        procs = {p.pid: p for p in tracker.history}  # the latest process for each pid
        entry: dict[int, str] = {}
        depth: dict[int, int] = {}
        labels: dict[int, str] = {}
        for pid, proc in procs.items():
            chain = []
            cur: int | None = pid
            seen = set()
            found = None
            while cur is not None and cur not in seen:
                seen.add(cur)
                if cur in entry_pids:
                    found = entry_pids[cur]
                    break
                if cur == honcho_pid:
                    found = "honcho"
                    break
                chain.append(cur)
                parent = procs.get(cur)
                cur = parent.parent if parent is not None else None
            if found is None:  # orphaned before it was seen: its group or session says which entry
                for s in proc.samples:
                    if s[2] in entry_pids or s[3] in entry_pids:
                        found = entry_pids.get(s[2]) or entry_pids[s[3]]
                        break
            entry[pid] = found or "?"
            depth[pid] = len(chain)
        for name, pid in started.items():
            sh = procs.get(pid)
            if sh is not None and sh.parent in procs and sh.parent != honcho_pid:
                labels[sh.parent] = f"honcho: reader of {name}"
        return entry, depth, labels

    def rows(self) -> list[dict[str, Any]]:
        tracker = self.tracker
        t0 = self.signal_at
        assert t0 is not None
        self.honcho_deliveries()
        entry, depth, labels = self.entry_of()
        started = {e.name: e.pid for _, e in self.honcho.events_of("started") if e.pid}
        stopped = {started.get(e.name): e.rc for _, e in self.honcho.events_of("stopped") if e.rc is not None}
        rows = []
        for proc in tracker.history:
            if proc.exit_at is not None and proc.exit_at <= t0:
                continue  # gone before the signal
            if proc.pid == tracker.honcho_pid and proc.exit_status is None and self.honcho_rc is not None:
                proc.exit_status = rc_to_wait_status(self.honcho_rc)
                proc.exit_status_source = "popen"
            if proc.exit_status is None and proc.pid in stopped:  # an entry's process: honcho's rc
                proc.exit_status = rc_to_wait_status(stopped[proc.pid])
                proc.exit_status_source = "honcho"
            code, termsig = (None, None)
            if proc.exit_status is not None:
                code, termsig = decode_wait_status(proc.exit_status)
            received = []
            killed_by_honcho = False
            signalled = False  # something reached it at an exactly known time
            for d in self.deliveries:
                if d.source == "honcho" and d.signum == signal.SIGKILL:
                    # It dies at once, often before the report reads honcho's line.
                    slack = 0.5 if termsig == signal.SIGKILL else 0.05 if termsig is None else -1
                    if proc.seen_at > d.at or (proc.exit_at is not None and proc.exit_at < d.at - slack):
                        continue
                    sample = proc.sample_at(d.at)
                    if sample is not None and sample[2] == d.pgid:
                        killed_by_honcho = True
                    continue
                # honcho sends its signal after printing the line, and the report reads the line a
                # little later (possibly after the process reacted to it). When nothing else reached
                # the process since the stop, it was in the same state as at the stop (t0).
                at = d.at
                if d.source == "honcho" and not signalled and d.at >= t0:
                    at = max(t0, proc.seen_at)
                if proc.seen_at > d.at or (proc.exit_at is not None and proc.exit_at <= at):
                    continue
                sample = proc.sample_at(at)
                if d.pgid is not None:
                    hit = sample is not None and sample[2] == d.pgid
                else:
                    hit = proc.pid in d.pids
                if not hit:
                    continue
                signalled = signalled or d.exact
                if d.signum == signal.SIGKILL:
                    continue
                disp = disposition(sample[4], sample[5], d.signum) if sample else "?"
                received.append({"signal": signal_name(d.signum), "disposition": disp, "source": d.source,
                                 "after_s": round(d.at - t0, 3), "exact": d.exact})
            if termsig is not None and termsig != signal.SIGKILL:
                killed_by_honcho = False
            left = proc in self.leftovers
            killed_at_timeout = proc.killed_by_report and not left
            sigkilled = (termsig == signal.SIGKILL or killed_by_honcho) and not proc.killed_by_report
            late = proc.seen_at > t0  # forked after it (a full scan of the tree ran just before it)
            argv = proc.cmdline
            label = labels.get(proc.pid) or short_command(argv, 200)
            if proc.pid == tracker.honcho_pid:
                label = "honcho start"
            indent = "  " * depth.get(proc.pid, 0)
            exit_after = None if proc.exit_at is None or left else round(proc.exit_at - t0, 3)
            rows.append({
                "entry": entry.get(proc.pid, "?"),
                "pid": proc.pid,
                "parent": proc.parent,
                "pgid": proc.samples[-1][2] if proc.samples else None,
                "sid": proc.samples[-1][3] if proc.samples else None,
                "depth": depth.get(proc.pid, 0),
                "process": shorten(indent + label, 40),
                "cmdline": argv,
                "started_after_signal": late,
                "signals": received,
                "signal_received": ("none (started after the signal)" if late and not received else
                                    describe_signals([(r["signal"], r["disposition"]) for r in received])),
                "exit_after_s": exit_after,
                "exit_time_source": proc.exit_time_source or None,
                "exit_code": code,
                "exit_signal": signal_name(termsig) if termsig else None,
                "exit": "-" if left else describe_exit(code, termsig),
                "exit_status_source": proc.exit_status_source or None,
                "sigkilled": sigkilled,
                "killed_by_honcho": killed_by_honcho and not proc.killed_by_report,
                "left_running": left,
                "killed_at_timeout": killed_at_timeout,
                "killed_by_report": proc.killed_by_report,
            })
        order = {"honcho": -1, **{n: i for i, n in enumerate(self.names)}}
        by_pid = {r["pid"]: r for r in rows}

        def key(r: dict[str, Any]) -> tuple[Any, ...]:
            path = []  # the ancestry inside the entry, so children follow their parent
            cur: dict[str, Any] | None = r
            while cur is not None and len(path) < 64:
                path.append(cur["pid"])
                parent = by_pid.get(cur["parent"])
                same_entry = parent is not None and parent["entry"] == r["entry"] and parent is not cur
                cur = parent if same_entry else None
            return (order.get(r["entry"], len(order)), list(reversed(path)))

        rows.sort(key=key)
        return rows

    def report(self) -> tuple[str, dict[str, Any], int]:
        t0 = self.signal_at
        assert t0 is not None
        rows = self.rows()
        sigkilled = [r for r in rows if r["sigkilled"]]
        left = [r for r in rows if r["left_running"]]
        problems = []
        if self.timed_out:
            n = sum(1 for r in rows if r["killed_at_timeout"])
            problems.append(f"honcho did not exit within {self.args.timeout:g} s: the report SIGKILLed it "
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
        honcho_exit = self.honcho.exit_at
        honcho_proc = self.tracker.current.get(self.tracker.honcho_pid or -1)
        if honcho_proc is not None and honcho_proc.exit_time_source == "proc connector":
            honcho_exit = honcho_proc.exit_at  # the kernel's time, not the next Popen poll
        honcho_after = None if honcho_exit is None else round(honcho_exit - t0, 3)
        rc = self.honcho_rc
        honcho_rc = "exit code unknown" if rc is None else (f"killed by {signal_name(-rc)}" if rc < 0
                                                             else f"exit code {rc}")
        source = ("exit codes and times from the Linux proc connector" if self.connector
                  else f"exit times from polling every {POLL_INTERVAL * 1000:.0f} ms; exit codes from "
                  f"honcho's 'stopped' lines and reaped orphans, '?' otherwise ({self.connector_note})")
        if self.tracker.connector_lost_events:
            source += " (some events were dropped; polling filled in)"
        nonzero = [r for r in rows if r["exit"] not in ("0", "-") and r["entry"] != "honcho"
                   and not r["sigkilled"] and not r["killed_by_report"]]
        data = {
            "directory": str(self.directory),
            "entries": self.names,
            "signal": signal_name(self.signum),
            "broadcast": bool(self.args.broadcast),
            "method": self.method,
            "honcho": {"pid": self.tracker.honcho_pid, "exit_code": self.honcho_rc,
                       "exit_after_s": honcho_after, "timed_out": self.timed_out},
            "last_exit_after_s": last,
            "observation": {"proc_connector": self.connector is not None, "note": self.connector_note,
                            "subreaper": self.subreaper, "polls": self.tracker.polls, "source": source,
                            "report_cpu_s": round(sum(os.times()[:2]), 2)},
            "processes": rows,
            "clean": not problems,
            "verdict": verdict,
            "exit_code": 1 if problems else 0,
        }
        lines = [
            f"shutdown report: {self.directory} ({len(self.names)} "
            f"{'entry' if len(self.names) == 1 else 'entries'}: {', '.join(self.names)})",
            f"stop:     {self.method}",
            f"honcho:   {honcho_rc}, "
            + (f"{honcho_after:.2f} s after the signal" if honcho_after is not None else "exit time unknown")
            + (f" (it had not exited within {self.args.timeout:g} s)" if self.timed_out else ""),
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


def rc_to_wait_status(rc: int) -> int:
    """A Popen-style return code (negative: killed by that signal) as a wait status."""
    return (-rc) & 0x7F if rc < 0 else (rc & 0xFF) << 8


def sigkilled_by(row: dict[str, Any]) -> str:
    """The table's SIGKILLed column: "no", "by honcho", "by report" or "yes" (someone else)."""
    if row["killed_by_report"]:
        return "by report"
    if row["killed_by_honcho"]:
        return "by honcho"
    return "yes" if row["sigkilled"] else "no"


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
    stopcheck.report.add_arguments(p)
    args = p.parse_args(argv)
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
    if args.manager != "honcho":  # another manager's stop, simulated or real: stopcheck/report.py
        with tempfile.TemporaryDirectory(prefix="shutdown-report-") as workdir:
            return stopcheck.report.main(args, directory, entries, Path(workdir))

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
        text, data, code = run.report()
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
