"""What each process of the tree went through in one stop: the rows of ``scripts/shutdown-report``.

For every process seen after the signal: the entry it belongs to (by its
ancestry under honcho's ``started`` pids, else its group or session), the
signals that reached it (the tty's ^C to the foreground group, the report's
own, honcho's ``killpg`` timed by its ``sending`` line) with the disposition
read from /proc just before, its exit (proc connector, reaped, honcho's
``stopped (rc=N)``, or Popen's), and whether it was SIGKILLed or left running.
"""

from __future__ import annotations

import signal
from typing import Any

from tools.stopcheck.session import Delivery, Run
from tools.stopcheck.text import (
    decode_wait_status,
    describe_exit,
    describe_signals,
    disposition,
    short_command,
    shorten,
    signal_name,
    signal_number,
)


def honcho_deliveries(run: Run) -> None:
    for t, e in run.honcho.events_of("sending"):
        if e.pid is not None:
            run.deliveries.append(Delivery(t, signal_number(e.signal), "honcho", pgid=e.pid,
                                            exact=False))
    run.deliveries.sort(key=lambda d: d.at)


def entry_of(run: Run) -> tuple[dict[int, str], dict[int, int], dict[int, str]]:
    """For each relevant pid: its entry name, its depth under the entry, and a label for helpers."""
    tracker = run.tracker
    started = {e.name: e.pid for _, e in run.honcho.events_of("started") if e.pid}
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


def rows(run: Run) -> list[dict[str, Any]]:
    tracker = run.tracker
    t0 = run.signal_at
    assert t0 is not None
    honcho_deliveries(run)
    entry, depth, labels = entry_of(run)
    started = {e.name: e.pid for _, e in run.honcho.events_of("started") if e.pid}
    stopped = {started.get(e.name): e.rc for _, e in run.honcho.events_of("stopped") if e.rc is not None}
    rows = []
    for proc in tracker.history:
        if proc.exit_at is not None and proc.exit_at <= t0:
            continue  # gone before the signal
        if proc.pid == tracker.honcho_pid and proc.exit_status is None and run.honcho_rc is not None:
            proc.exit_status = rc_to_wait_status(run.honcho_rc)
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
        for d in run.deliveries:
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
        left = proc in run.leftovers
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
    order = {"honcho": -1, **{n: i for i, n in enumerate(run.names)}}
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


def rc_to_wait_status(rc: int) -> int:
    """A Popen-style return code (negative: killed by that signal) as a wait status."""
    return (-rc) & 0x7F if rc < 0 else (rc & 0xFF) << 8
