"""The bench's measures of one set, each on fresh data directories and free ports (see tools/bench/run.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.procset import free_port
from tools.bench.session import (
    CLIENTS,
    DROPPED,
    E2E_JOBS,
    HEALTHZ_SECONDS,
    LOADED_CLIENTS,
    LOADED_SECONDS,
    LOADED_STOP_AFTER,
    LONG_JOB,
    LONG_STOP_AFTER,
    ROLES,
    ROOT,
    SHORT_JOB,
    SHORT_STOP_AFTER,
    TERMINAL,
    WORKER_PROCESSES,
    Session,
    SetSpec,
)


def measure_rest(spec: SetSpec, base: Path) -> dict[str, Any]:
    """Start, /healthz rate, 1,000 jobs, memory at rest, idle stop."""
    s = Session(spec, base / "rest", free_port())
    try:
        s.start()
        start_s = s.wait_first_job()
        healthz = s.load("--seconds", str(HEALTHZ_SECONDS), "--concurrency", str(CLIENTS))
        body = json.dumps({"task": "sleep", "args": {"seconds": 0}})
        submit = s.load("--method", "POST", "--path", "/jobs", "--body", body, "--count", str(E2E_JOBS),
                        "--concurrency", str(CLIENTS), "--ids")
        done_at, states = s.wait_terminal(submit["ids"], timeout=120)
        not_ok = sum(1 for v in states.values() if v != "succeeded")
        time.sleep(1.0)  # at rest: beat, timers and the last acks settle (memory, not timing)
        pss_roles = s.pss_mib()
        stop = s.stop()
    finally:
        s.ps.cleanup()
    return {
        "start_s": start_s,
        "healthz_rps": healthz["rate"],
        "healthz_errors": sum(healthz["errors"].values()),
        "submit_rate": submit["rate"],
        "submit_errors": sum(submit["errors"].values()) + (E2E_JOBS - submit["ok"]),
        "e2e_rate": len(submit["ids"]) / (done_at - submit["started"]),
        "e2e_not_succeeded": not_ok,
        "pss_mib": sum(pss_roles.values()),
        **{f"pss_{role}_mib": pss_roles.get(role, 0.0) for role in ROLES},
        "idle_stop_s": stop["seconds"],
        "idle_stop_clean": stop["clean"],
        "idle_stop_sigkills": stop["sigkills"],
    }


def measure_busy(spec: SetSpec, base: Path, job_seconds: float, stop_after: float) -> dict[str, Any]:
    """Ctrl+C while two jobs run; restart on the same data and see what became of them."""
    workdir = base / f"busy-{job_seconds:g}"
    redis_port = free_port()
    s = Session(spec, workdir, redis_port)
    try:
        s.start()
        s.wait_first_job()
        submitted = time.monotonic()
        ids = [s.submit("sleep", seconds=job_seconds) for _ in range(WORKER_PROCESSES)]
        assert all(ids), f"{spec.label} refused a job"
        time.sleep(max(0.0, submitted + stop_after - time.monotonic()))  # the moment to stop
        remaining = job_seconds - (time.monotonic() - submitted)
        stop = s.stop()
    finally:
        s.ps.cleanup()

    again = Session(spec, workdir, redis_port)
    try:
        again.start()
        # A job handed back runs again from the start: allow its whole length.
        _, states = again.wait_terminal(ids, timeout=10 + job_seconds)
        again.stop()
    finally:
        again.ps.cleanup()
    return {
        "stop_s": stop["seconds"],
        "remaining_s": remaining,
        "clean": stop["clean"],
        "sigkills": stop["sigkills"],
        "failed": sum(1 for v in states.values() if v == "failed"),
        "lost": sum(1 for v in states.values() if v not in TERMINAL),
    }


def measure_loaded(spec: SetSpec, base: Path) -> dict[str, Any]:
    """Ctrl+C while 32 clients post echo jobs and long-poll them; what became of every request and job."""
    workdir = base / "loaded"
    redis_port = free_port()
    s = Session(spec, workdir, redis_port)
    try:
        s.start()
        s.wait_first_job()
        loader = subprocess.Popen(
            [sys.executable, "-m", "tools.bench.load", "--port", str(s.ps.port), "--flow", "jobs",
             "--seconds", str(LOADED_SECONDS), "--concurrency", str(LOADED_CLIENTS), "--wait", "5"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(LOADED_STOP_AFTER)  # the moment to stop, with the load flowing
        stop = s.stop()
        out, _ = loader.communicate(timeout=120)
    finally:
        s.ps.cleanup()
    load = json.loads(out)
    outcomes: dict[str, int] = {}
    for counts in load["outcomes"].values():
        for outcome, n in counts.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n

    accepted = load["accepted"]
    again = Session(spec, workdir, redis_port)
    try:
        again.start()
        again.wait_first_job()
        _, states = again.wait_terminal(accepted, timeout=30) if accepted else (0.0, {})
        again.stop()
    finally:
        again.ps.cleanup()
    return {
        "stop_s": stop["seconds"],
        "clean": stop["clean"],
        "sigkills": stop["sigkills"],
        "answered": sum(n for k, n in outcomes.items() if k.startswith("answered:")),
        "refused": outcomes.get("refused", 0),
        "dropped": sum(outcomes.get(k, 0) for k in DROPPED),
        "5xx": sum(n for k, n in outcomes.items() if k.startswith("answered:5")),
        "accepted": len(accepted),
        "lost": sum(1 for v in states.values() if v not in TERMINAL),
        "failed": sum(1 for v in states.values() if v == "failed"),
    }


def measure_round(spec: SetSpec, base: Path) -> dict[str, Any]:
    out = measure_rest(spec, base)
    for case, (job, after) in {"short": (SHORT_JOB, SHORT_STOP_AFTER),
                               "long": (LONG_JOB, LONG_STOP_AFTER)}.items():
        busy = measure_busy(spec, base, job, after)
        out.update({f"busy_{case}_{k}": v for k, v in busy.items()})
    out.update({f"loaded_{k}": v for k, v in measure_loaded(spec, base).items()})
    return out
