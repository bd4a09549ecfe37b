"""What happened on the several-host bed (tests/hosts.py): from the workers' logs and the clients' record.

A run of a job is its ``attempt N started`` line and the line that ended it
(succeeded, handed back, lease lapsed, taken over) or the host's kill; times
are the log's clock, seconds since midnight (one machine: every host's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

FINISHED = ("succeeded", "failed")


@dataclass
class Run:
    """One run of a job as a worker's log tells it: where, which attempt, when it began and how it ended."""

    job: str
    host: str
    attempt: int
    started: float  # seconds since midnight, the log's clock (one machine: every host's)
    ended: float | None = None
    end: str = "running"  # succeeded, handed back, stopped (lease lapsed / taken over), killed


_LOG = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \S+ \w+ jobs: job (?P<job>[0-9a-f]{32}):? (?P<text>.*)$")
#: Every line of tasks/jobs.py that ends a run, and what it means here.
_ENDS = (("attempt (?P<n>\\d+) succeeded", "succeeded"),
         ("handed back to the queue \\(attempt (?P<n>\\d+)", "handed back"),
         # the hand-back not in the ledger but in a new message (jobs/handbacks.py), or left to the sweeper
         ("attempt (?P<n>\\d+) interrupted by shutdown; .*; sent again in a new message", "handed back"),
         ("attempt (?P<n>\\d+) interrupted by shutdown", "interrupted"),
         ("attempt (?P<n>\\d+) ended but its", "interrupted"),  # outcome not stored at the stop
         ("attempt (?P<n>\\d+) stops itself", "lease lapsed"),
         ("attempt (?P<n>\\d+) stopped", "taken over"),
         ("attempt (?P<n>\\d+) is no longer the job's run", "taken over"),
         ("failed$", "failed"))


def clock(line: str) -> float | None:
    match = re.match(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) ", line)
    if not match:
        return None
    h, m, s, ms = map(int, match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def now_clock() -> float:
    now = datetime.now()
    return now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6


def runs_in(host: str, lines: list[str]) -> list[Run]:
    """Every run of a job in ``host``'s worker lines, in order."""
    runs: list[Run] = []
    open_runs: dict[tuple[str, int], Run] = {}
    for line in lines:
        match = _LOG.match(line)
        if not match:
            continue
        at, job, text = clock(line), match["job"], match["text"]
        if started := re.match(r"attempt (\d+) started$", text):
            run = Run(job, host, int(started[1]), at)
            runs.append(run)
            open_runs[(job, run.attempt)] = run
            continue
        for pattern, end in _ENDS:
            if ended := re.match(pattern, text):
                key = (job, int(ended["n"])) if "n" in ended.groupdict() else next(
                    (k for k in reversed(open_runs) if k[0] == job), (job, -1))
                run = open_runs.pop(key, None)
                if run is not None:
                    run.ended, run.end = at, end
                break
    return runs


@dataclass
class Handback:
    job: str
    from_host: str
    to_host: str | None  # where it ran next (None: never)
    waited: float | None  # from the hand-back to the next run's start (s)


def outcomes(record: dict[str, Any]) -> dict[str, int]:
    """Requests by outcome as the clients saw them: answered, 5xx codes, reset, refused, timeout."""
    counts: dict[str, int] = {}
    for request in record["requests"]:
        counts[request["outcome"]] = counts.get(request["outcome"], 0) + 1
    return counts


def handbacks(runs: list[Run]) -> list[Handback]:
    found = []
    for run in runs:
        if run.end != "handed back":
            continue
        later = [r for r in runs if r.job == run.job and r.started >= run.started and r is not run]
        nxt = min(later, key=lambda r: r.started, default=None)
        found.append(Handback(run.job, run.host, nxt.host if nxt else None,
                              nxt.started - run.ended if nxt and run.ended is not None else None))
    return found


def at_once(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Pairs of runs of one job that overlapped in time (a run still going when the next began)."""
    pairs = []
    by_job: dict[str, list[Run]] = {}
    for run in runs:
        by_job.setdefault(run.job, []).append(run)
    for job_runs in by_job.values():
        job_runs.sort(key=lambda r: r.started)
        for first, second in zip(job_runs, job_runs[1:], strict=False):
            if first.ended is None or first.ended > second.started:
                pairs.append((first, second))
    return pairs


def summary(record: dict[str, Any], ledger: dict[str, dict[str, Any]], runs: list[Run]) -> dict[str, Any]:
    """What it cost: requests by outcome, jobs accepted / lost / run twice / failed, hand-backs."""
    accepted = [job["id"] for job in record["jobs"]]
    succeeded_runs: dict[str, int] = {}
    for run in runs:
        if run.end == "succeeded":
            succeeded_runs[run.job] = succeeded_runs.get(run.job, 0) + 1
    latencies = [job["seen_end"] - job["posted"] for job in record["jobs"] if job["seen_end"]]
    backs = handbacks(runs)
    return {
        "requests": outcomes(record),
        "accepted": len(accepted),
        "lost": sum(1 for job in accepted if ledger.get(job, {}).get("status") not in FINISHED),
        "failed": sum(1 for job in accepted if ledger.get(job, {}).get("status") == "failed"),
        "run_twice": sum(1 for count in succeeded_runs.values() if count > 1),
        "at_once": len(at_once(runs)),
        "handed_back": len(backs),
        "handback_waits": sorted(b.waited for b in backs if b.waited is not None),
        "handback_hosts": [(b.from_host, b.to_host) for b in backs],
        "longest_latency": max(latencies, default=0.0),
    }


def trouble(record: dict[str, Any], ledger: dict[str, dict[str, Any]], runs: list[Run]) -> list[str]:
    """Each accepted job that did not end well, with its ledger row and runs: for a failure's message."""
    pairs = {id(first) for pair in at_once(runs) for first in pair}
    found = []
    for job in record["jobs"]:
        row = ledger.get(job["id"], {})
        job_runs = [r for r in runs if r.job == job["id"]]
        if (row.get("status") != "succeeded" or sum(r.end == "succeeded" for r in job_runs) > 1
                or any(id(r) in pairs for r in job_runs)):
            found.append(f"{job} ledger={row} runs={job_runs}")
    return found


def story(runs: list[Run], job: str, since: float) -> str:
    """A job's runs in seconds from ``since``: ``job 1a2b3c4d: a 0.0-6.1 lease lapsed, b 8.2-20.2 ...``."""
    told = [f"{r.host} {r.started - since:.1f}-"
            + ("?" if r.ended is None else f"{r.ended - since:.1f}") + f" {r.end}"
            for r in sorted((r for r in runs if r.job == job), key=lambda r: r.started)]
    return f"job {job[:8]}: " + ", ".join(told)
