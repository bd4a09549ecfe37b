"""Run a manager's plan for real: start its units, stop them by its policies, and watch every process.

Every unit is started in a session of its own (as systemd, supervisord, a
dyno or a container runtime does); a container's command runs as PID 1 of a
new PID namespace (``unshare --pid --fork --mount-proc``, root only), so the
kernel's rules for PID 1 apply for real: a signal without a handler is
dropped, and when PID 1 exits every other process of the namespace is
SIGKILLed. The engine signals processes from outside, by host pid, like
dockerd or the kubelet. What happens to each process is observed with
tools.stopcheck.proctrack (subreaper, /proc polls) and tools.stopcheck.connector (the
proc connector); whatever the engine started is killed by pid in
:meth:`Engine.cleanup`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.stopcheck.connector import open_proc_connector
from tools.stopcheck.plans import Plan, Unit
from tools.stopcheck.policy import GROUP, MAIN, REST, Send, UnitState, step
from tools.stopcheck.proctrack import (
    POLL_INTERVAL,
    Proc,
    Tracker,
    poll_until,
    read_masks,
    read_stat,
    set_child_subreaper,
)
from tools.stopcheck.text import disposition, signal_name

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")


class NotReady(Exception):
    pass


@dataclass
class Delivery:
    at: float
    signum: int
    disposition: str  # "handled", "ignored", "default action", "?"
    by: str  # "manager" or "report"


@dataclass
class Running:
    unit: Unit
    popen: subprocess.Popen[bytes]
    root: int  # the pid the engine started (unshare for a container)
    main: int | None = None  # the unit's main process (a container's PID 1, by its host pid)
    main_starttime: int | None = None
    started_at: float = 0.0
    state: UnitState = field(default_factory=UnitState)
    stopping: bool = False


class Engine:
    def __init__(self, plan: Plan, directory: Path, env: Mapping[str, str] | None = None, *,
                 verbose: bool = False, log: Path | None = None, proc_connector: bool = True) -> None:
        self.plan = plan
        self.directory = directory
        self.env = dict(os.environ if env is None else env)
        self.verbose = verbose
        self.log = open(log, "w", encoding="utf-8") if log else None  # noqa: SIM115
        self.tracker = Tracker()
        self.subreaper = set_child_subreaper()
        self.connector, self.connector_note = open_proc_connector() if proc_connector else (None, "off")
        self.running: dict[str, Running] = {}
        self.deliveries: dict[int, list[Delivery]] = {}
        self.lines: list[tuple[float, str, str]] = []
        self.signal_at: float | None = None
        self.timed_out = False
        self.leftovers: list[Proc] = []
        self._lock = threading.Lock()
        self._stop_threads = threading.Event()
        self._threads: list[threading.Thread] = []
        if self.connector:
            self._thread(self.connector.run, self.tracker, self._stop_threads)
        self._thread(self._poller)

    def _thread(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _poller(self) -> None:
        poll_until(self.tracker, self._stop_threads, connector=bool(self.connector))

    # -- start -----------------------------------------------------------------
    def start(self, names: Iterable[str] | None = None, *, as_name: str | None = None) -> None:
        """Start the plan's units (or those named; ``as_name``: one more copy of one, e.g. a new dyno)."""
        for unit in self.plan.units:
            if names is not None and unit.name not in names:
                continue
            if unit.pid1 and os.geteuid() != 0:
                raise NotReady("a container's PID namespace (unshare --pid) needs root")
            name = as_name or unit.name
            env = dict(unit.env) if unit.clean_env else {**self.env, **unit.env}
            argv = (*UNSHARE, *unit.argv) if unit.pid1 else unit.argv
            popen = subprocess.Popen(argv, cwd=unit.cwd or self.directory, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            run = Running(unit, popen, popen.pid, started_at=time.monotonic())
            if not unit.pid1:
                run.main = popen.pid
            with self.tracker.lock:
                self.tracker.waited.add(popen.pid)  # Popen reaps it (the tracker's polls find it)
            self.running[name] = run
            assert popen.stdout is not None
            self._thread(self._read, name, popen.stdout)

    def _read(self, name: str, stream: object) -> None:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.lines.append((time.monotonic(), name, line))
            text = f"{time.strftime('%H:%M:%S')} {name} | {line}"
            if self.verbose:
                print(text, file=sys.stderr, flush=True)
            if self.log:
                self.log.write(text + "\n")
                self.log.flush()

    def output(self, name: str | None = None) -> list[str]:
        with self._lock:
            return [line for _, n, line in self.lines if name is None or n == name]

    def _find_main(self, run: Running) -> bool:
        """A container's PID 1 is unshare's only child."""
        if run.main is None:
            with self.tracker.lock:
                kids = [p for p in self.tracker.current.values() if p.parent == run.root and not p.gone]
            if kids:
                run.main = kids[0].pid
        if run.main is not None and run.main_starttime is None:
            st = read_stat(run.main)
            run.main_starttime = st.starttime if st else -1
        return run.main is not None

    def wait_up(self, up: float = 3.0, url: str | None = None, timeout: float = 60) -> None:
        """Every unit's main process is ``up`` seconds old (and ``url`` answers 2xx)."""
        from tools.stopcheck.traffic import url_answers

        deadline = time.monotonic() + timeout
        while True:
            live = {n: r for n, r in self.running.items() if not r.stopping}  # not the units stopped
            for name, run in live.items():
                if run.popen.poll() is not None:
                    raise NotReady(f"{name} exited with code {run.popen.returncode} before the set was up")
            ready = all(self._find_main(r) and time.monotonic() - r.started_at >= up for r in live.values())
            if ready and (url is None or url_answers(url)):
                return
            if time.monotonic() > deadline:
                why = f": {url} did not answer 2xx" if url else ""
                raise NotReady(f"not up within {timeout:g} s{why}")
            time.sleep(0.1)

    # -- membership --------------------------------------------------------------
    def _unit_of(self) -> dict[int, str]:
        """Each tracked pid's unit: by ancestry to a unit's root, else by session (each unit has its own)."""
        roots = {r.root: name for name, r in self.running.items()}
        with self.tracker.lock:
            procs = {p.pid: p for p in self.tracker.history}
        out: dict[int, str] = {}
        for pid, proc in procs.items():
            cur: int | None = pid
            seen: set[int] = set()
            while cur is not None and cur not in seen and cur not in roots:
                seen.add(cur)
                parent = procs.get(cur)
                cur = parent.parent if parent is not None else None
            if cur in roots:
                out[pid] = roots[cur]
                continue
            for s in proc.samples:
                if s[3] in roots:
                    out[pid] = roots[s[3]]
                    break
        return out

    def members(self, name: str, unit_of: dict[int, str] | None = None) -> list[Proc]:
        """The unit's processes still running (a container's: without unshare, the runtime)."""
        unit_of = self._unit_of() if unit_of is None else unit_of
        run = self.running[name]
        out = []
        for proc in self.tracker.alive():
            if unit_of.get(proc.pid) == name and not (run.unit.pid1 and proc.pid == run.root):
                out.append(proc)
        return out

    def _main_alive(self, run: Running) -> bool:
        if run.main is None:
            return run.popen.poll() is None
        st = read_stat(run.main)
        return st is not None and st.state not in "ZX" and st.starttime == run.main_starttime

    # -- stop --------------------------------------------------------------------
    def stop(self, names: Iterable[str] | None = None, limit: float | None = None) -> None:
        """Stop the named units (default: all) as their manager does; return when it counts them stopped."""
        targets = [n for n in self.running if names is None or n in names]
        for n in targets:
            self._find_main(self.running[n])
            self.running[n].stopping = True
        self.tracker.poll(full=True)  # dispositions just before the signal
        started = time.monotonic()
        if self.signal_at is None:
            self.signal_at = started
        if limit is None:
            policies = [self.running[n].unit.policy for n in targets]
            limit = sum(p.timeout * 2 + p.pre_stop for p in policies) + 15
        while True:
            now = time.monotonic()
            unit_of = self._unit_of()
            pending = False
            for n in targets:
                run = self.running[n]
                if run.state.done is not None:
                    continue
                members = self.members(n, unit_of)
                main_alive = self._main_alive(run)
                rest_alive = any(p.pid != run.main for p in members)
                deps = all(self.running[d].state.done is not None for d in run.unit.policy.after
                           if d in self.running and d in targets)
                for send in step(run.unit.policy, run.state, now, main_alive=main_alive,
                                 rest_alive=rest_alive, deps_done=deps):
                    self._deliver(run, send, members)
                pending = pending or run.state.done is None
            if not pending:
                return
            if now - started > limit:
                self.timed_out = True
                for n in targets:
                    self._kill(self.members(n), "report")
                return
            time.sleep(POLL_INTERVAL)

    def _deliver(self, run: Running, send: Send, members: list[Proc]) -> None:
        """One of the manager's signals, to its recipients, by host pid (disposition read just before)."""
        if send.to == MAIN:
            pids = [run.main] if run.main is not None else []
        elif send.to == GROUP:
            st = read_stat(run.main) if run.main else None
            pids = [p.pid for p in members if st and (s := read_stat(p.pid)) and s.pgid == st.pgid]
        elif send.to == REST:
            pids = [p.pid for p in members if p.pid != run.main]
        else:
            pids = [p.pid for p in members]
        by = "report" if run.unit.real_manager and send.signum == signal.SIGKILL else "manager"
        now = time.monotonic()
        for pid in pids:
            ign, cgt = read_masks(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, send.signum)
                self.deliveries.setdefault(pid, []).append(
                    Delivery(now, send.signum, disposition(ign, cgt, send.signum), by))

    def _kill(self, procs: Iterable[Proc], by: str) -> None:
        now = time.monotonic()
        for proc in procs:
            self.deliveries.setdefault(proc.pid, []).append(Delivery(now, signal.SIGKILL, "-", by))
        self.tracker.kill(procs)

    def settle(self, seconds: float = 2.0) -> list[Proc]:
        """After the stop: what of the stopped units still runs ``seconds`` later is left running (then
        killed by the report). Units not stopped (a new dyno started during a deploy) are not counted."""
        stopped = {n for n, r in self.running.items() if r.stopping}
        deadline = time.monotonic() + seconds
        while self.ours(stopped) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        self.tracker.poll(full=True)
        time.sleep(0.1)  # exit events already sent by the kernel reach the connector thread
        self.leftovers = self.ours(stopped)
        if self.leftovers:
            self._kill(self.leftovers, "report")
        self._drain(5, stopped)
        return self.leftovers

    def ours(self, names: set[str] | None = None) -> list[Proc]:
        """Running processes of the engine's units (or those named): not unshare, nor anything else."""
        unit_of = self._unit_of()
        runtime = {r.root for r in self.running.values() if r.unit.pid1}
        return [p for p in self.tracker.alive() if p.pid in unit_of and p.pid not in runtime
                and (names is None or unit_of[p.pid] in names)]

    def _drain(self, timeout: float, names: set[str]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tracker.reap_all()
            if not self.ours(names) and all(r.popen.poll() is not None for n, r in self.running.items()
                                            if n in names):
                break
            time.sleep(POLL_INTERVAL)
        self.tracker.poll(full=True)

    def stop_observing(self) -> None:
        time.sleep(0.05)  # exit events already sent by the kernel reach the connector thread
        self._stop_threads.set()
        for t in self._threads:
            t.join(2)
        if self.connector:
            self.connector.close()
            self.connector = None

    def cleanup(self) -> None:
        """Whatever happened: nothing the engine started stays running (killed by pid)."""
        with contextlib.suppress(Exception):
            self.tracker.poll(full=True)
        self.tracker.kill(self.ours())
        for run in self.running.values():
            if run.popen.poll() is None:
                run.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.popen.wait(5)
        self.tracker.reap_all()
        if not self._stop_threads.is_set():
            self.stop_observing()
        for t in self._threads:
            t.join(2)  # the output readers: their pipes are at EOF once the processes are gone
        for run in self.running.values():
            if run.popen.stdout is not None and not any(t.is_alive() for t in self._threads):
                run.popen.stdout.close()
        if self.log:
            self.log.close()
            self.log = None

    def describe_deliveries(self, pid: int) -> list[tuple[str, str, str, float]]:
        """(signal name, disposition, by, seconds after the stop) for each signal the engine sent to pid."""
        t0 = self.signal_at or 0.0
        return [(signal_name(d.signum), d.disposition, d.by, round(d.at - t0, 3))
                for d in self.deliveries.get(pid, [])]
