"""What a stop report sees of a process tree by reading /proc: each process, its states, its end.

Shared by ``scripts/shutdown-report`` (tools.stopcheck.session) and the managers'
simulation (tools.stopcheck.engine), so both observe processes the same way:

- the observer is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so processes
  that daemonise or are orphaned are reparented to it and stay in its tree;
- the tree is polled every 20 ms from ``/proc``: parent, process group,
  session, command line and signal dispositions (``SigIgn``/``SigCgt``);
- the proc connector (tools.stopcheck.connector) feeds the :class:`Tracker` the
  fork, exec and exit events with the exit status and a kernel timestamp.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tools.stopcheck.text import parse_status_masks

POLL_INTERVAL = 0.02
FULL_SCAN_EVERY = 10  # with the proc connector, a full /proc scan every 10th poll (else every poll)
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Stat:
    state: str
    ppid: int
    pgid: int
    sid: int
    starttime: int  # clock ticks after boot: tells a process from a later one with the same pid


def read_stat(pid: int) -> Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return Stat(fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def read_masks(pid: int) -> tuple[int | None, int | None]:
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = parse_status_masks(f.read())
    except OSError:
        return None, None
    return masks.get("SigIgn"), masks.get("SigCgt")


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    if not raw:  # kernel thread or zombie; try the short name
        try:
            with open(f"/proc/{pid}/comm") as f:
                return [f"[{f.read().strip()}]"]
        except OSError:
            return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def all_stats() -> dict[int, Stat]:
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                stats[int(name)] = st
    return stats


def set_child_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------
# What the report saw of each process
# --------------------------------------------------------------------------


@dataclass
class Proc:
    pid: int
    parent: int  # parent when first known (at fork, from the proc connector, else at first sight)
    seen_at: float  # monotonic: forked (connector) or first seen (poll)
    forked: bool  # seen_at is the fork time
    starttime: int | None = None
    cmdline: list[str] = field(default_factory=list)
    # (monotonic time, ppid, pgid, sid, SigIgn, SigCgt), appended when something changes
    samples: list[tuple[float, int, int, int, int | None, int | None]] = field(default_factory=list)
    exit_at: float | None = None
    exit_time_source: str = ""  # "proc connector" or "poll"
    exit_status: int | None = None  # wait status
    exit_status_source: str = ""  # "proc connector", "reaped", "honcho", "popen"
    killed_by_report: bool = False
    gone: bool = False  # no longer in /proc (not even as a zombie)

    def sample_at(self, t: float) -> tuple[float, int, int, int, int | None, int | None] | None:
        """The last state sampled at or before t (else the first one)."""
        best = None
        for s in self.samples:
            if s[0] <= t or best is None:
                best = s
            else:
                break
        return best


class Tracker:
    """Every process of the tree under the report, from polls of /proc and the proc connector."""

    def __init__(self) -> None:
        self.root = os.getpid()
        self.lock = threading.RLock()
        self.current: dict[int, Proc] = {}  # pid -> its latest process
        self.history: list[Proc] = []
        self.honcho_pid: int | None = None
        self.waited: set[int] = set()  # other children a Popen waits for: never reaped here
        self.polls = 0
        self.connector_lost_events = False

    # -- from the proc connector (its thread) -------------------------------
    def note_fork(self, parent_tgid: int, child: int, t: float) -> None:
        with self.lock:
            parent = self.current.get(parent_tgid)
            if parent_tgid != self.root and (parent is None or parent.exit_at is not None):
                return
            known = self.current.get(child)
            if known is not None and known.exit_at is None and known.seen_at >= t:
                known.seen_at, known.forked, known.parent = t, True, parent_tgid  # a poll saw it first
                return
            proc = Proc(child, parent_tgid, t, forked=True)
            self._add(proc)
            self._refresh(proc, t)

    def note_exec(self, pid: int, t: float) -> None:
        with self.lock:
            proc = self.current.get(pid)
            if proc is not None and proc.exit_at is None:
                proc.cmdline = read_cmdline(pid) or proc.cmdline
                self._refresh(proc, t)

    def note_exit(self, pid: int, status: int, t: float) -> None:
        with self.lock:
            proc = self.current.get(pid)
            if proc is None or proc.exit_status_source == "proc connector":
                return
            if proc.exit_at is None or proc.exit_time_source != "proc connector":
                proc.exit_at = t
                proc.exit_time_source = "proc connector"
            proc.exit_status = status
            proc.exit_status_source = "proc connector"

    # -- polling -------------------------------------------------------------
    def _add(self, proc: Proc) -> None:
        self.current[proc.pid] = proc
        self.history.append(proc)

    def _refresh(self, proc: Proc, t: float, full: bool = True) -> Stat | None:
        st = read_stat(proc.pid)
        if st is None:
            return None
        if proc.starttime is None:
            proc.starttime = st.starttime
        elif proc.starttime != st.starttime:
            return None  # the pid now belongs to another process
        if not proc.cmdline or (full and st.state != "Z"):  # full polls catch an exec the connector missed
            proc.cmdline = read_cmdline(proc.pid) or proc.cmdline
        ign, cgt = read_masks(proc.pid) if st.state != "Z" else (None, None)
        last = proc.samples[-1] if proc.samples else None
        if st.state != "Z":
            if last is None or last[1:] != (st.ppid, st.pgid, st.sid, ign, cgt):
                proc.samples.append((t, st.ppid, st.pgid, st.sid, ign, cgt))
        return st

    def poll(self, full: bool) -> None:
        with self.lock:
            t = time.monotonic()
            self.polls += 1
            if full:
                stats = all_stats()
                children: dict[int, list[int]] = {}
                for pid, st in stats.items():
                    children.setdefault(st.ppid, []).append(pid)
                tree: list[int] = []
                todo = list(children.get(self.root, []))
                while todo:
                    pid = todo.pop()
                    tree.append(pid)
                    todo.extend(children.get(pid, []))
                for pid in tree:
                    st = stats[pid]
                    proc = self.current.get(pid)
                    if proc is None or (proc.starttime is not None and proc.starttime != st.starttime):
                        proc = Proc(pid, st.ppid, t, forked=False)
                        self._add(proc)
            for proc in list(self.current.values()):
                if proc.gone:
                    continue
                st = self._refresh(proc, t, full)
                if st is None:
                    proc.gone = True  # reaped by its parent (or the pid is another process now)
                if st is None or st.state in "ZX":
                    if proc.exit_at is None:
                        proc.exit_at = t
                        proc.exit_time_source = "poll"
                    if st is not None and st.ppid == self.root:
                        self.reap(proc)

    def reap(self, proc: Proc) -> None:
        """Collect an orphan that was reparented to the report (never honcho: Popen waits for it)."""
        if proc.pid == self.honcho_pid or proc.pid in self.waited or proc.exit_status_source == "reaped":
            return
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == proc.pid:
            if proc.exit_at is None:
                proc.exit_at = time.monotonic()
                proc.exit_time_source = "poll"
            if proc.exit_status is None:
                proc.exit_status = status
                proc.exit_status_source = "reaped"

    def reap_all(self) -> None:
        with self.lock:
            for proc in self.current.values():
                st = read_stat(proc.pid)
                if st is not None and st.state == "Z" and st.ppid == self.root:
                    self.reap(proc)

    def alive(self) -> list[Proc]:
        """Tracked processes still running (not zombies), checked now."""
        with self.lock:
            out = []
            for proc in self.current.values():
                st = read_stat(proc.pid)
                if st is not None and st.state not in "ZX" and st.starttime == proc.starttime:
                    out.append(proc)
            return out

    def kill(self, procs: Iterable[Proc]) -> None:
        """SIGKILL these processes by pid (only if the pid is still the same process)."""
        with self.lock:
            for proc in procs:
                st = read_stat(proc.pid)
                if st is not None and st.starttime == proc.starttime and st.state not in "ZX":
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.killed_by_report = True


def poll_until(tracker: Tracker, stop: threading.Event, *, connector: bool) -> None:
    """Poll ``tracker`` every :data:`POLL_INTERVAL` until ``stop`` is set (a thread's loop).

    With the proc connector, a full /proc scan every :data:`FULL_SCAN_EVERY`th
    poll (or as soon as it lost events); without it, every poll.
    """
    every = FULL_SCAN_EVERY if connector else 1
    n = 0
    while not stop.is_set():
        tracker.poll(full=n % every == 0 or tracker.connector_lost_events)
        n += 1
        stop.wait(POLL_INTERVAL)
