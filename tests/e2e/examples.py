"""What the example apps' busy stops share (test_foreign_app.py, test_flask_app.py).

An example app runs under honcho from its own directory with stopright on its
path; a request stream (tools/bench/load.py's job flow) races the Ctrl+C; the same
verdicts hold for every app: no 5xx, no reset, no SIGKILL, every process's
stop sequence, nothing left running.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.e2e.checks import SEQUENCE, assert_shutdown_sequence
from tests.procset import ROOT, ProcessSet

CLIENTS, LOAD_SECONDS = 4, 6.0
#: Request outcomes a stop must never cause (tools/bench/load.py's names).
NEVER = ("reset", "closed", "truncated", "hung")


def example_sets(tmp_path: Path, env: dict[str, str], cwd: Path) -> Iterator[Callable[[], ProcessSet]]:
    """For a fixture: sets of one example app on one var/ (a restart finds the queue), killed by pid."""
    started: list[ProcessSet] = []

    def make() -> ProcessSet:
        ps = ProcessSet(tmp_path, env=env, cwd=cwd)  # stopright: installed, as a user installs it
        started.append(ps)
        return ps

    yield make
    for ps in started:
        ps.cleanup()


def start_ready(ps: ProcessSet) -> None:
    """Until the worker, beat and web are all up (a stop before that is test_early_stop's)."""
    ps.start()
    ps.wait_for_line(r"\bready\.$", 60, name="worker")
    ps.wait_for_line(r"beat: Starting", 30, name="beat")
    deadline = time.monotonic() + 30
    while ps.http("GET", "/healthz").status != 200:
        assert time.monotonic() < deadline, ps.output
        time.sleep(0.05)
    ps.snapshot()


def run_load(ps: ProcessSet) -> subprocess.Popen[str]:
    """tools/bench/load.py's job flow: POST /jobs, then GET /jobs/<id>, every request's outcome counted."""
    return subprocess.Popen(
        [sys.executable, "-m", "tools.bench.load", "--port", str(ps.port), "--flow", "jobs", "--wait", "0",
         "--seconds", str(LOAD_SECONDS), "--concurrency", str(CLIENTS)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)


def load_result(loader: subprocess.Popen[str]) -> dict[str, Any]:
    """The stream's outcome, once it ends: no request cut by the stop, and enough answered."""
    out, _ = loader.communicate(timeout=60)
    result = json.loads(out)
    bad = [event for event in result["events"] if event[2] in NEVER or event[2].startswith("answered:5")]
    assert not bad, (result["outcomes"], bad)
    assert not [e for e in result["events"] if e[2].startswith(("error:", "connect:"))], result["events"]
    answered = sum(n for counts in result["outcomes"].values() for kind, n in counts.items()
                   if kind.startswith("answered:2"))
    assert answered >= 20, result["outcomes"]
    return result


def assert_stopped_right(ps: ProcessSet, rc: int, processes: tuple[str, ...]) -> None:
    """Ctrl+C's exit code, no SIGKILL (honcho's, or the worker's own of a child that did not hand
    back), no phase overran, each process's stop sequence, nothing left running."""
    out = ps.output
    assert rc == 130, out
    assert "SIGKILL" not in out, out
    assert "exits now (exit code" not in out and "stop phase overran" not in out, out
    for name in processes:
        assert re.search(rf"{name}\.1 stopped \(rc=(?:0|-15)\)", out), (name, out)
        assert_shutdown_sequence(ps.lines(name), name, SEQUENCE)
    survivors = ps.survivors()
    assert not survivors, [(p.pid, p.cmdline()) for p in survivors]
