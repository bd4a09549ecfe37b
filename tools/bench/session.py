"""The three sets the bench compares, and one running set: its HTTP driver, stop timer and memory reading.

Each set runs under honcho in a pseudo-terminal through the end-to-end
tests' harness (tests/procset.py ProcessSet, on tools.stopcheck.honcho's driver):
a free port, fresh data directories, Ctrl+C typed into the terminal.
Used by tools/bench/run.py (the timed rounds) and tools/bench/profile.py (py-spy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.procset import ROOT, ProcessSet, redis_server_dir  # the e2e tests' harness

RESULTS = ROOT / "tools" / "bench" / "results"

WEB_PROCESSES = 2
WORKER_PROCESSES = 2
GRACE_SECONDS = 3.0  # the project's default SHUTDOWN_GRACE_SECONDS
SHORT_JOB, SHORT_STOP_AFTER = 1.5, 0.8  # Ctrl+C with about 0.7 s of work left
LONG_JOB, LONG_STOP_AFTER = 12.0, 1.0
E2E_JOBS, CLIENTS = 1000, 16
LOADED_CLIENTS, LOADED_SECONDS, LOADED_STOP_AFTER = 32, 6.0, 1.5
DROPPED = ("reset", "closed", "truncated", "hung")  # tools/bench/load.py outcomes: never acceptable
HEALTHZ_SECONDS = 3.0
STOP_TIMEOUT = 30.0
TERMINAL = ("succeeded", "failed")


# -- the three sets -----------------------------------------------------------
@dataclass(frozen=True)
class SetSpec:
    key: str
    label: str
    cwd: Path
    extra_env: Callable[[Path], dict[str, str]]

    def make(self, workdir: Path, port_env: dict[str, str]) -> ProcessSet:
        env = {**self.extra_env(workdir), **port_env}
        return ProcessSet(workdir, env=env, cwd=self.cwd)


def _project_env(workdir: Path) -> dict[str, str]:
    # Default logging (INFO), like the reference's --loglevel INFO: both log every task.
    return {"WEB_WORKERS": str(WEB_PROCESSES), "WORKER_CONCURRENCY": str(WORKER_PROCESSES),
            "SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS)}


def _reference_env(workdir: Path) -> dict[str, str]:
    (workdir / "var").mkdir(parents=True, exist_ok=True)
    bin_dir = redis_server_dir(workdir / "bin")  # its Procfile runs `redis-server`
    return {"WEB_CONCURRENCY": str(WEB_PROCESSES), "WORKER_CONCURRENCY": str(WORKER_PROCESSES),
            "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", "")}


def _foreign_env(workdir: Path) -> dict[str, str]:
    # The reference's environment, plus stopright's grace (its default, said) and its spool of
    # refused requeues kept in the round's data, not the user's ~/.local/state.
    return {**_reference_env(workdir), "SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
            "STOPRIGHT_SPOOL_DIR": str(workdir / "var")}


PROJECT = SetSpec("project", "this set", ROOT, _project_env)
#: The reference plus stopright's lines (examples/foreign/README.md): stopright's own cost.
FOREIGN = SetSpec("foreign", "foreign app + stopright", ROOT / "examples" / "foreign", _foreign_env)
REFERENCE = SetSpec("reference", "stock reference", ROOT / "tools" / "bench" / "reference", _reference_env)
SETS = (PROJECT, FOREIGN, REFERENCE)


def round_order(n: int) -> tuple[SetSpec, ...]:
    """Round n's order, A B C then C B A: drift over a round hits every set alike."""
    return SETS if n % 2 == 0 else SETS[::-1]


# -- one running set ----------------------------------------------------------
class Session:
    """One start of a set: its HTTP driver, stop timer and memory reading."""

    def __init__(self, spec: SetSpec, workdir: Path, redis_port: int) -> None:
        self.spec = spec
        self.ps = spec.make(workdir, {"REDIS_PORT": str(redis_port)})
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.ps.start()

    def submit(self, task: str, **args: Any) -> str | None:
        r = self.ps.http("POST", "/jobs", {"task": task, "args": args}, timeout=10)
        return r.body["id"] if r.status == 202 else None

    def status(self, job_id: str) -> str:
        r = self.ps.http("GET", f"/jobs/{job_id}", timeout=10)
        return r.body["status"] if r.status == 200 else "unreachable"

    def wait_first_job(self, timeout: float = 60) -> float:
        """Seconds from start until a submitted zero-second job has finished."""
        deadline = self.started_at + timeout
        job_id = None
        while job_id is None:
            self._check_alive(deadline)
            job_id = self.submit("sleep", seconds=0)
            if job_id is None:
                time.sleep(0.02)
        while self.status(job_id) != "succeeded":
            self._check_alive(deadline)
            time.sleep(0.01)
        return time.monotonic() - self.started_at

    def _check_alive(self, deadline: float) -> None:
        if self.ps.proc is not None and self.ps.proc.poll() is not None:
            raise RuntimeError(f"{self.spec.label} exited while starting:\n{self.ps.output[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{self.spec.label} not ready in time:\n{self.ps.output[-3000:]}")

    def load(self, *extra: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "tools.bench.load", "--port", str(self.ps.port), *extra],
                             cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout)

    def wait_terminal(self, ids: list[str], timeout: float) -> tuple[float, dict[str, str]]:
        """Poll until every job is succeeded or failed: the monotonic time the last one was seen so.

        The last submitted job is polled first, then every other is checked once
        (most are done by then; one still running moves the finish time on), so
        the polling barely loads the set it times.
        """
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        finished_at = time.monotonic()
        for job_id in [ids[-1], *ids[:-1]]:
            polls = 0
            while True:
                states[job_id] = self.status(job_id)
                if states[job_id] in TERMINAL or time.monotonic() > deadline:
                    break
                polls += 1
                time.sleep(0.01)
            if job_id == ids[-1] or polls:
                finished_at = time.monotonic()
        return finished_at, states

    def pss_mib(self) -> dict[str, float]:
        """Proportional set size of every process of the set, by role (RSS where PSS is unreadable)."""
        roles: dict[str, float] = {}
        for p in self.ps.snapshot():
            try:
                try:
                    size = p.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    size = p.memory_info().rss
                role = role_of(p.cmdline())
            except psutil.NoSuchProcess:
                continue
            roles[role] = roles.get(role, 0.0) + size / 2**20
        return roles

    def stop(self) -> dict[str, Any]:
        """Ctrl+C in the terminal; seconds until honcho and every process of the tree are gone."""
        self.ps.snapshot()
        before = len(self.ps.lines())
        started = time.monotonic()
        self.ps.ctrl_c()
        deadline = started + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if self.ps.proc.poll() is not None and not self.ps.survivors():
                break
            time.sleep(0.005)
        seconds = time.monotonic() - started
        clean = self.ps.proc.poll() is not None and not self.ps.survivors()
        time.sleep(0.05)  # let the reader thread take honcho's last lines (not timed)
        killed = sum("sending SIGKILL" in line for line in self.ps.lines()[before:])
        self.ps.cleanup()
        return {"seconds": seconds, "clean": clean, "sigkills": killed}


ROLES = ("honcho", "web", "worker", "beat", "broker", "shell")


def role_of(cmdline: list[str]) -> str:
    """Which part of the set a process is, from its command line (for the memory breakdown)."""
    line = " ".join(cmdline)
    if "honcho" in line:
        return "honcho"
    if cmdline and cmdline[0] in ("/bin/sh", "sh"):
        return "shell"  # the reference's Procfile lines have no exec: sh stays as the parent
    if "gunicorn" in line:
        return "web"
    if " beat" in line:
        return "beat"
    if " worker" in line:
        return "worker"
    return "broker"  # redis-server, and this set's broker watcher

