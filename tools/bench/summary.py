"""The bench's figures: medians over the rounds, the targets met or not, the Markdown table.

Two sets of targets: this set's against the stock reference, and stopright's cost (the foreign
app, the reference plus stopright's lines, against the reference).
"""

from __future__ import annotations

import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tools.bench.session import (
    CLIENTS,
    E2E_JOBS,
    GRACE_SECONDS,
    LOADED_CLIENTS,
    LOADED_STOP_AFTER,
    LONG_JOB,
    LONG_STOP_AFTER,
    ROLES,
    ROOT,
    SHORT_JOB,
    SHORT_STOP_AFTER,
)


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


#: stopright's cost: the foreign app's figure over the reference's, and the bound (a floor for rates).
COST_GOALS = (("submit_rate", "submit rate", 0.98), ("e2e_rate", "end-to-end rate", 0.98),
              ("pss_mib", "memory at rest (PSS)", 1.05))


def cost_targets(foreign: dict[str, Any], ref: dict[str, Any]) -> list[dict[str, Any]]:
    """stopright's cost, foreign app over reference: rates over a floor, memory under a ceiling."""
    rows = []
    for key, name, bound in COST_GOALS:
        ratio = foreign[key] / ref[key]
        m = next(m for m in MEASURES if m.key == key)
        rate = not m.lower_is_better
        rows.append({"target": f"{name} {'at least' if rate else 'at most'} {bound:g}x the reference's",
                     "figure": f"{fmt(foreign[key], m)} vs {fmt(ref[key], m)} ({ratio:.3f}x)",
                     "ratio": ratio, "met": ratio >= bound if rate else ratio <= bound})
    return rows


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


#: The generated page's columns, in order: (key, label).
COLUMNS = (("project", "this set"), ("foreign", "foreign app + stopright"), ("reference", "stock reference"))


def markdown(report: dict[str, Any]) -> str:
    med, mach = report["medians"], report["machine"]
    ref = med["reference"]
    lines = [
        f"Run {report['finished']} on {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB,"
        f" Linux {mach['kernel']}, Python {mach['python']}, commit {mach['commit']}:"
        f" {report['rounds']} rounds, A B C then C B A alternating, medians ({report['minutes']:.1f} min).",
        "",
        "This set is the demo (the Procfile at the root); the foreign app is the stock reference plus",
        "stopright's lines (examples/foreign); the stock reference is tools/bench/reference.",
        "",
        "| measure | " + " | ".join(label for _, label in COLUMNS)
        + " | this / reference | foreign / reference |",
        "|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for m in MEASURES:
        ratios = ["" if m.key in COUNTS or not ref[m.key] else f"{med[k][m.key] / ref[m.key]:.2f}"
                  for k in ("project", "foreign")]
        lines.append(f"| {m.label.strip()} | " + " | ".join(fmt(med[k][m.key], m) for k, _ in COLUMNS)
                     + " | " + " | ".join(ratios) + " |")
    lines += ["", "Memory at rest by part of the set (PSS, MiB, medians):", "",
              "| " + " | ".join(("", *ROLES)) + " |", "|---" * (len(ROLES) + 1) + "|"]
    for key, label in COLUMNS:
        lines.append(f"| {label} | " + " | ".join(f"{med[key][f'pss_{r}_mib']:.1f}" for r in ROLES) + " |")
    kills = {k: v["idle_stop_sigkills"] + v["busy_short_sigkills"] + v["busy_long_sigkills"]
             + v["loaded_sigkills"] for k, v in med.items()}
    lines += ["", "honcho had to SIGKILL, over all timed stops: "
              + ", ".join(f"{label} {kills[k]} times" for k, label in COLUMNS) + "."]
    for title, rows in (("This set against the stock reference:", report["targets"]),
                        ("stopright's cost: the foreign app against the stock reference:",
                         report["cost_targets"])):
        lines += ["", title, "", "| target | figure | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['figure']} | {'yes' if t['met'] else '**no**'} |" for t in rows]
    return "\n".join(lines) + "\n"


# -- the rolling restart under traffic (tools/bench/rolling.py) -------------------------------------

ROLLING_TITLE = "Rolling restart under traffic (two hosts behind HAProxy)"
_OUTCOMES = ("answered", "5xx", "reset", "refused", "timeout", "other")


def _outcomes(requests: dict[str, int]) -> list[str]:
    """Requests by outcome in the table's columns; 5xx with its codes."""
    codes = {k: v for k, v in requests.items() if k.isdigit()}
    known = {"answered", "reset", "refused", "timeout", *codes}
    other = sum(v for k, v in requests.items() if k not in known)
    fives = str(sum(codes.values())) + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())) + ")"
                                        if codes else "")
    return [str(requests.get("answered", 0)), fives, *(str(requests.get(k, 0)) for k in
                                                          ("reset", "refused", "timeout")), str(other)]


def _count(value: int | None) -> str:
    return "—" if value is None else str(value)


def _waits(waits: list[float] | None) -> str:
    """min / median / max of every delay (a row's own [min, median, max] gives itself back)."""
    if waits is None:
        return "—"
    if not waits:
        return "none"
    return f"{min(waits):.2f} / {statistics.median(waits):.2f} / {max(waits):.2f}"


def _span(span: list[float] | None) -> str:
    return "—" if not span else f"{span[0]:.2f}–{span[1]:.2f}"


def rolling_markdown(report: dict[str, Any]) -> str:
    """The rolling restart row: one line per set over its restarts, then every restart."""
    mach, settings = report["machine"], report["settings"]
    lines = [
        f"## {ROLLING_TITLE}", "",
        f"Run {report['finished']} on {mach['cpu']}, {mach['cores']} cores, Linux {mach['kernel']},"
        f" Python {mach['python']}, commit {mach['commit']}: {report['rounds']} rolling restarts per set"
        f" ({report['minutes']:.1f} min).",
        "",
        "Hosts a and b (network namespaces) behind HAProxy (deploy/haproxy.cfg as shipped: retries off;"
        " \"retries on\": the file's optional retry lines, a refused connection retried on the other"
        " server, never a POST that was sent; \"nginx\": deploy/nginx-upstream.conf in its place, a restarted"
        " host back once its check path answers 200);"
        f" {settings['clients']} clients post sleep jobs (seconds:weight {settings['mix']}) and poll them"
        " until they end. One restart: host a stopped (SIGTERM to its honcho), started again and waited"
        " for until HAProxy has it UP, then host b.",
        f"This set: the Procfile on each host, PostgreSQL and RabbitMQ on a third host, drain"
        f" {settings['drain_seconds']:g} s, grace {settings['grace_seconds']:g} s; jobs lost, failed, run"
        " twice and handed back from its ledger and worker logs. The stock reference: its web, worker"
        " and beat on each host, one Redis on a third host, HAProxy checking /healthz (it has no /readyz);"
        " its jobs as the clients saw them: lost is never seen to end within"
        f" {settings['finish_seconds']:g} s of the load's end. Both: {settings['web_processes']} web"
        f" processes and {settings['worker_concurrency']} worker processes per host.",
        "",
        "| set | restarts | requests answered | 5xx | reset | refused | timeout | other | jobs accepted"
        " | lost | failed | run twice | handed back | hand-back to next run, min / median / max (s)"
        " | stop, SIGTERM to honcho exit (s) | restart to back in rotation (s) | longest job latency (s)"
        " | SIGKILL by honcho |",
        "|---|" + "---:|" * 17,
    ]
    for kind, row in report["rows"].items():
        lines.append(f"| {kind} | {row['restarts']} | " + " | ".join(_outcomes(row["requests"])) + " | "
                     + " | ".join(_count(row[k]) for k in ("accepted", "lost", "failed", "run_twice",
                                                           "handed_back"))
                     + f" | {_waits(row['handback_waits'])} | {_span(row['stop_s'])} | {_span(row['back_s'])}"
                     f" | {row['longest_latency_s']:.2f} | {row['sigkills']} |")
    lines += ["", "Each restart:", "",
              "| set | restart | requests answered | 5xx | reset | refused | timeout | other | jobs accepted"
              " | lost | failed | run twice | handed back | hand-back to next run, min / median / max (s)"
              " | stop a / b (s) | restart to UP a / b (s) | longest job latency (s)"
              " | SIGKILL by honcho |",
              "|---|" + "---:|" * 17]
    for kind, restarts in report["restarts"].items():
        for n, r in enumerate(restarts, 1):
            lines.append(f"| {kind} | {n} | " + " | ".join(_outcomes(r["requests"])) + " | "
                         + " | ".join(_count(r[k]) for k in ("accepted", "lost", "failed", "run_twice",
                                                             "handed_back"))
                         + f" | {_waits(r['handback_waits'])}"
                         f" | {r['stop_s']['a']:.2f} / {r['stop_s']['b']:.2f}"
                         f" | {r['back_s']['a']:.2f} / {r['back_s']['b']:.2f}"
                         f" | {r['longest_latency_s']:.2f} | {r['sigkills']} |")
    return "\n".join(lines) + "\n"
