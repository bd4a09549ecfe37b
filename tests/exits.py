"""How every process a test started ended, also those no manager was left to report: the proc connector.

When honcho dies (SIGKILL) or its output reader does (``| tee`` and a
Ctrl+C), nobody prints the programs' shutdown lines or honcho's ``stopped
(rc=N)``: the exit status is the proof left. :class:`ExitWatch` follows every
process forked under this one (tools.stopcheck.proctrack's Tracker, fed by the
kernel's proc connector: the exit status and time of each, orphans
included). It never reaps anything: the test's ``Popen`` objects keep their
own children.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from tests.servers import missing
from tools.stopcheck.connector import open_proc_connector
from tools.stopcheck.proctrack import Proc, Tracker, poll_until
from tools.stopcheck.text import decode_wait_status, describe_exit


class _Observer(Tracker):
    def reap(self, proc: Proc) -> None:  # the test's Popen objects wait for their own children
        pass


@dataclass(frozen=True)
class Ended:
    pid: int
    parent: int
    command: str
    exit: str | None  # "0", "1", "SIGTERM", "SIGKILL"; None while running
    at: float | None  # monotonic

    @property
    def name(self) -> str:
        return self.command.split(" ", 1)[0].rsplit("/", 1)[-1]


class ExitWatch:
    """Fork, exec and exit of every process under this one, from now until :meth:`close`."""

    def __init__(self) -> None:
        connector, why = open_proc_connector()
        if connector is None:
            missing(f"the exit status of orphans needs the proc connector: {why}", "REQUIRE_PROC_CONNECTOR")
        self.connector = connector
        self.tracker = _Observer()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=connector.run, args=(self.tracker, self._stop), daemon=True),
                         threading.Thread(target=poll_until, args=(self.tracker, self._stop),
                                          kwargs={"connector": True}, daemon=True)]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.connector.close()

    def under(self, pid: int) -> list[Ended]:
        """Every process forked under ``pid`` (the latest start of it), at any depth, in fork order."""
        with self.tracker.lock:
            history = list(self.tracker.history)
        roots = [p for p in history if p.pid == pid]
        if not roots:
            return []
        found, wanted = [], {id(roots[-1])}
        latest: dict[int, Proc] = {roots[-1].pid: roots[-1]}
        for proc in history[history.index(roots[-1]) + 1:]:
            parent = latest.get(proc.parent)
            if parent is not None and id(parent) in wanted:
                wanted.add(id(proc))
                found.append(proc)
            latest[proc.pid] = proc
        rows: dict[tuple[int, int | None], Ended] = {}  # a poll and the connector may both add one process
        for proc in found:
            row, key = self._ended(proc), (proc.pid, proc.starttime)
            if key not in rows or rows[key].exit is None:
                rows[key] = row
        return list(rows.values())

    def _ended(self, proc: Proc) -> Ended:
        status = proc.exit_status if proc.exit_status_source == "proc connector" else None
        exit = describe_exit(*decode_wait_status(status)) if status is not None else None
        return Ended(proc.pid, proc.parent, " ".join(proc.cmdline), exit, proc.exit_at if exit else None)

    def wait_gone(self, pid: int, timeout: float) -> list[Ended]:
        """Until every process under ``pid`` has exited (its status known) or ``timeout``: the rows."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.under(pid)
            if all(r.exit is not None for r in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)
