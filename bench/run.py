"""scripts/bench: this process set and the stock reference, side by side, in one run.

The two sets run alternately (A B A B ...), each round on fresh data
directories and free ports, because a shared machine drifts: only figures
taken in the same run are compared. Every measure drives both sets through
the same job API (POST /jobs, GET /jobs/<id>, GET /healthz) with the same
harness as the end-to-end tests (tests/procset.py: honcho in a pseudo-terminal,
Ctrl+C typed into it). Medians are reported with the ratio this/reference,
and each target of the project is reported as met or not.

Per set and round, four sessions:
  1. start (time to the first finished job), /healthz rate, 1,000 zero-second
     jobs (submit rate, end-to-end rate), memory at rest, then an idle Ctrl+C;
  2. busy stop, short jobs: Ctrl+C with two jobs each needing under 1 s more;
     restart on the same data and count the jobs lost or failed;
  3. busy stop, long jobs (12 s, more than the grace budget): the same;
  4. busy stop under load: Ctrl+C while 32 clients post jobs and long-poll
     them (bench/load.py --flow jobs); every request counted by outcome
     (answered, refused, reset or dropped, 5xx), then a restart on the same
     data and the accepted jobs lost or failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.procset import ProcessSet, free_port, redis_server_dir  # noqa: E402  (the e2e tests' harness)

RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"

WEB_PROCESSES = 2
WORKER_PROCESSES = 2
GRACE_SECONDS = 3.0  # the project's default SHUTDOWN_GRACE_SECONDS
SHORT_JOB, SHORT_STOP_AFTER = 1.5, 0.8  # Ctrl+C with about 0.7 s of work left
LONG_JOB, LONG_STOP_AFTER = 12.0, 1.0
E2E_JOBS, CLIENTS = 1000, 16
LOADED_CLIENTS, LOADED_SECONDS, LOADED_STOP_AFTER = 32, 6.0, 1.5
DROPPED = ("reset", "closed", "truncated", "hung")  # bench/load.py outcomes: never acceptable
HEALTHZ_SECONDS = 3.0
STOP_TIMEOUT = 30.0
TERMINAL = ("succeeded", "failed")


# -- the two sets -------------------------------------------------------------
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


PROJECT = SetSpec("project", "this set", ROOT, _project_env)
REFERENCE = SetSpec("reference", "stock reference", ROOT / "bench" / "reference", _reference_env)


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
        out = subprocess.run([sys.executable, "-m", "bench.load", "--port", str(self.ps.port), *extra],
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


# -- the measures -------------------------------------------------------------
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
            [sys.executable, "-m", "bench.load", "--port", str(s.ps.port), "--flow", "jobs",
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


# -- report -------------------------------------------------------------------
@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    unit: str
    digits: int
    lower_is_better: bool


MEASURES = [
    Measure("start_s", "start to ready (first job finished)", "s", 2, True),
    Measure("idle_stop_s", "idle stop (Ctrl+C to every process gone)", "s", 2, True),
    Measure("busy_short_stop_s",
            f"busy stop, short jobs ({SHORT_JOB:g} s, Ctrl+C after {SHORT_STOP_AFTER:g} s)", "s", 2, True),
    Measure("busy_short_lost", "  jobs lost (of 2 per round, all rounds)", "", 0, True),
    Measure("busy_short_failed", "  jobs failed (of 2 per round, all rounds)", "", 0, True),
    Measure("busy_long_stop_s", f"busy stop, long jobs ({LONG_JOB:g} s, Ctrl+C after {LONG_STOP_AFTER:g} s)",
            "s", 2, True),
    Measure("busy_long_lost", "  jobs lost (of 2 per round, all rounds)", "", 0, True),
    Measure("busy_long_failed", "  jobs failed (of 2 per round, all rounds)", "", 0, True),
    Measure("loaded_stop_s", f"busy stop under load ({LOADED_CLIENTS} clients posting and long-polling jobs,"
            f" Ctrl+C after {LOADED_STOP_AFTER:g} s)", "s", 2, True),
    Measure("loaded_dropped", "  requests reset or dropped (all rounds)", "", 0, True),
    Measure("loaded_5xx", "  requests answered 5xx (all rounds)", "", 0, True),
    Measure("loaded_refused", "  connections refused once stopping (all rounds)", "", 0, True),
    Measure("loaded_lost", "  accepted jobs lost (all rounds)", "", 0, True),
    Measure("loaded_failed", "  accepted jobs failed (all rounds)", "", 0, True),
    Measure("submit_rate", f"submit rate (POST /jobs, {CLIENTS} clients)", "/s", 0, False),
    Measure("e2e_rate", f"end-to-end rate ({E2E_JOBS:,} zero-second jobs)", "/s", 0, False),
    Measure("healthz_rps", f"GET /healthz ({CLIENTS} clients)", "/s", 0, False),
    Measure("pss_mib", "memory of the whole set at rest (PSS)", "MiB", 1, True),
]
COUNTS = {"busy_short_lost", "busy_short_failed", "busy_long_lost", "busy_long_failed",
          "loaded_dropped", "loaded_5xx", "loaded_refused", "loaded_lost", "loaded_failed",
          "loaded_accepted", "loaded_answered"}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of each measure; job counts are totals over the rounds."""
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        if key in COUNTS or key.endswith(("_sigkills", "_errors", "_not_succeeded")):
            out[key] = sum(values)
        elif isinstance(values[0], bool):
            out[key] = all(values)
        else:
            out[key] = statistics.median(values)
    return out


def targets(this: dict[str, Any], ref: dict[str, Any]) -> list[dict[str, Any]]:
    def row(name: str, figure: str, met: bool) -> dict[str, Any]:
        return {"target": name, "figure": figure, "met": bool(met)}

    short_over = this["busy_short_stop_s"] - this["busy_short_remaining_s"]
    long_limit = GRACE_SECONDS + 0.5
    long_bad = this["busy_long_lost"] + this["busy_long_failed"]
    return [
        row("idle stop no slower than the reference",
            f"{this['idle_stop_s']:.2f} s vs {ref['idle_stop_s']:.2f} s",
            this["idle_stop_s"] <= ref["idle_stop_s"]),
        row("busy stop, short jobs: within 0.5 s of the longest remaining job",
            f"{this['busy_short_stop_s']:.2f} s with {this['busy_short_remaining_s']:.2f} s of work left"
            f" (+{short_over:.2f} s)", short_over <= 0.5),
        row(f"busy stop, long jobs: within the grace budget + 0.5 s ({long_limit:g} s), 0 lost or failed",
            f"{this['busy_long_stop_s']:.2f} s, {this['busy_long_lost']} lost,"
            f" {this['busy_long_failed']} failed"
            f" (reference: {ref['busy_long_lost']} lost, {ref['busy_long_failed']} failed)",
            this["busy_long_stop_s"] <= long_limit and long_bad == 0),
        row("busy stop under load: no request reset, dropped or 5xx, no accepted job lost or failed,"
            " no SIGKILL",
            f"{this['loaded_stop_s']:.2f} s, {this['loaded_dropped']} dropped, {this['loaded_5xx']} 5xx,"
            f" {this['loaded_lost']} lost, {this['loaded_failed']} failed of {this['loaded_accepted']},"
            f" {this['loaded_sigkills']} SIGKILL (reference: {ref['loaded_dropped']} dropped,"
            f" {ref['loaded_5xx']} 5xx, {ref['loaded_lost']} lost, {ref['loaded_failed']} failed"
            f" of {ref['loaded_accepted']})",
            this["loaded_dropped"] + this["loaded_5xx"] + this["loaded_lost"] + this["loaded_failed"]
            + this["loaded_sigkills"] == 0),
        row("start to ready within 1.2x the reference",
            f"{this['start_s']:.2f} s vs {ref['start_s']:.2f} s ({this['start_s'] / ref['start_s']:.2f}x)",
            this["start_s"] <= 1.2 * ref["start_s"]),
        row("end-to-end rate at least the reference's",
            f"{this['e2e_rate']:.0f}/s vs {ref['e2e_rate']:.0f}/s", this["e2e_rate"] >= ref["e2e_rate"]),
        row("submit rate at least the reference's",
            f"{this['submit_rate']:.0f}/s vs {ref['submit_rate']:.0f}/s",
            this["submit_rate"] >= ref["submit_rate"]),
        row("memory within 1.1x the reference",
            f"{this['pss_mib']:.1f} MiB vs {ref['pss_mib']:.1f} MiB"
            f" ({this['pss_mib'] / ref['pss_mib']:.2f}x)",
            this["pss_mib"] <= 1.1 * ref["pss_mib"]),
    ]


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "kernel": platform.release(), "python": platform.python_version(),
            "commit": commit + ("+changes" if dirty else "")}


def fmt(value: Any, m: Measure) -> str:
    if m.key in COUNTS:
        return str(value)
    return f"{value:,.{m.digits}f}{' ' + m.unit if m.unit and not m.unit.startswith('/') else m.unit}"


def markdown(report: dict[str, Any]) -> str:
    this, ref, mach = report["medians"]["project"], report["medians"]["reference"], report["machine"]
    lines = [
        f"Run {report['finished']} on {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB,"
        f" Linux {mach['kernel']}, Python {mach['python']}, commit {mach['commit']}:"
        f" {report['rounds']} rounds, A B alternating, medians ({report['minutes']:.1f} min).",
        "",
        "| measure | this set | stock reference | this / reference |",
        "|---|---:|---:|---:|",
    ]
    for m in MEASURES:
        a, b = this[m.key], ref[m.key]
        ratio = "" if m.key in COUNTS or not b else f"{a / b:.2f}"
        lines.append(f"| {m.label.strip()} | {fmt(a, m)} | {fmt(b, m)} | {ratio} |")
    lines += ["", "Memory at rest by part of the set (PSS, MiB, medians):", "",
              "| " + " | ".join(("", *ROLES)) + " |", "|---" * (len(ROLES) + 1) + "|"]
    for key, label in (("project", "this set"), ("reference", "reference")):
        lines.append(f"| {label} | " + " | ".join(f"{report['medians'][key][f'pss_{r}_mib']:.1f}"
                                                   for r in ROLES) + " |")
    kills = {k: v["idle_stop_sigkills"] + v["busy_short_sigkills"] + v["busy_long_sigkills"]
             + v["loaded_sigkills"] for k, v in report["medians"].items()}
    lines += ["", f"honcho had to SIGKILL: this set {kills['project']} times, the reference"
              f" {kills['reference']} times, over all timed stops.", "",
              "| target | figure | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['figure']} | {'yes' if t['met'] else '**no**'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> bool:
    text = README.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    README.write_text(f"{head}{README_START}\n{table}{README_END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="A B pairs to run (default 3)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's table")
    parser.add_argument("--profile", action="store_true",
                        help="instead: py-spy each set's web and worker during 1,000 jobs")
    args = parser.parse_args(argv)
    if args.profile:
        from bench import profile

        return profile.main()
    began = time.monotonic()
    per_set: dict[str, list[dict[str, Any]]] = {"project": [], "reference": []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for n in range(args.rounds):
            order = (PROJECT, REFERENCE) if n % 2 == 0 else (REFERENCE, PROJECT)
            for spec in order:
                t = time.monotonic()
                result = measure_round(spec, Path(tmp) / f"{n}-{spec.key}")
                per_set[spec.key].append(result)
                print(f"round {n + 1}/{args.rounds} {spec.label}: {time.monotonic() - t:.0f} s "
                      + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in result.items()), file=sys.stderr, flush=True)
    medians = {k: summarize(v) for k, v in per_set.items()}
    report = {
        "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": args.rounds, "minutes": (time.monotonic() - began) / 60,
        "machine": machine(),
        "settings": {"web_processes": WEB_PROCESSES, "worker_processes": WORKER_PROCESSES,
                     "grace_seconds": GRACE_SECONDS, "clients": CLIENTS},
        "medians": medians, "targets": targets(medians["project"], medians["reference"]),
        "rounds_raw": per_set,
    }
    table = markdown(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(table)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    if not args.no_readme:
        print("README.md table updated" if update_readme(table) else "README.md has no bench markers",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
