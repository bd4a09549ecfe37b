"""One stop of a Procfile's set under honcho, watched: start, readiness, the signal, the wait, the clean-up.

The set runs under honcho in a pseudo-terminal (tools.stopcheck.honcho). The
report is a child subreaper and tracks the whole tree (tools.stopcheck.proctrack,
tools.stopcheck.connector) while it stops the set the way a user or a platform
would: ``^C`` typed into honcho's terminal (SIGINT to its foreground group),
SIGTERM to honcho, or the signal to every process at once. Whatever it
started is killed by pid in :meth:`Run.cleanup`, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tools.stopcheck.connector import ProcConnector, open_proc_connector
from tools.stopcheck.honcho import Honcho
from tools.stopcheck.proctrack import POLL_INTERVAL, Proc, Tracker, poll_until, set_child_subreaper
from tools.stopcheck.text import signal_name
from tools.stopcheck.traffic import url_answers


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
        waiting = [f"{entry} printed no line matching {regex.pattern!r}" for entry, regex in args.ready_lines
                   if not any(regex.search(text) for text in honcho.texts(entry))]
        ready = ready and not waiting
        if ready and args.url:
            if time.monotonic() - last_url_check >= 0.2:
                last_url_check = time.monotonic()
                ready = url_answers(args.url)
            else:
                ready = False
        if ready:
            return
        if time.monotonic() > deadline:
            what = "; ".join(waiting) if waiting else (f"{args.url} did not answer 2xx" if args.url
                                                       else "not every entry was up")
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
        poll_until(self.tracker, self.stop_threads, connector=bool(self.connector))

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
            foreground = honcho.foreground()
            self.signal_at = time.monotonic()
            honcho.ctrl_c()
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
