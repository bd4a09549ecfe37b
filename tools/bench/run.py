"""scripts/bench: this process set, the foreign app and the stock reference, side by side, in one run.

The three sets (tools/bench/session.py SETS: this set, examples/foreign, which
is the reference plus stopright's lines, and tools/bench/reference) run
alternately (A B C, then C B A, ...), each round on fresh data directories and
free ports, because a shared machine drifts: only figures taken in the same
run are compared. Every measure drives every set through
the same job API (POST /jobs, GET /jobs/<id>, GET /healthz) with the same
harness as the end-to-end tests (tests/procset.py: honcho in a pseudo-terminal,
Ctrl+C typed into it). Medians are reported with the ratios this/reference
and foreign/reference, and each target is reported as met or not: this set's,
and stopright's cost (the foreign app's rates and memory against the reference's).

Per set and round, four sessions:
  1. start (time to the first finished job), /healthz rate, 1,000 zero-second
     jobs (submit rate, end-to-end rate), memory at rest, then an idle Ctrl+C;
  2. busy stop, short jobs: Ctrl+C with two jobs each needing under 1 s more;
     restart on the same data and count the jobs lost or failed;
  3. busy stop, long jobs (12 s, more than the grace budget): the same;
  4. busy stop under load: Ctrl+C while 32 clients post jobs and long-poll
     them (tools/bench/load.py --flow jobs); every request counted by outcome
     (answered, refused, reset or dropped, 5xx), then a restart on the same
     data and the accepted jobs lost or failed.

The parts: tools/bench/session.py (the three sets, one running set), tools/bench/measures.py
(the four sessions), tools/bench/summary.py (medians, targets, the table),
tools/bench/load.py (the load client), tools/bench/profile.py (--profile).

Then, where the machine allows (root, `ip`, HAProxy, PostgreSQL, RabbitMQ, Redis), the rolling
restart under traffic (tools/bench/rolling.py): this set and the reference on two hosts behind
HAProxy, each host stopped and started again in turn, --rolling N times per set (default 3).
`--only rolling` runs just that row. Its figures go to tools/bench/results/rolling.{md,json},
and into latest.{md,json} (a `rolling` key; with --only, latest.md is rendered again from
latest.json with the new row, the other figures untouched).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench import rolling
from tools.bench.measures import measure_round
from tools.bench.session import (
    CLIENTS,
    GRACE_SECONDS,
    RESULTS,
    SETS,
    WEB_PROCESSES,
    WORKER_PROCESSES,
    round_order,
)
from tools.bench.summary import cost_targets, machine, markdown, rolling_markdown, summarize, targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every set to run (default 3)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: py-spy each set's web and worker during 1,000 jobs")
    parser.add_argument("--rolling", type=int, nargs="?", const=rolling.ROUNDS, default=rolling.ROUNDS,
                        metavar="N", help="rolling restarts per set, two hosts behind HAProxy"
                        f" (default {rolling.ROUNDS}; needs root, ip, haproxy, PostgreSQL, RabbitMQ, Redis)")
    parser.add_argument("--only", choices=("rolling",), help="run only this row")
    args = parser.parse_args(argv)
    if args.profile:
        from tools.bench import profile

        return profile.main()
    if args.only == "rolling":
        return only_rolling(args.rolling)
    began = time.monotonic()
    per_set: dict[str, list[dict[str, Any]]] = {spec.key: [] for spec in SETS}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for n in range(args.rounds):
            for spec in round_order(n):
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
        "cost_targets": cost_targets(medians["foreign"], medians["reference"]),
        "rounds_raw": per_set,
    }
    report["rolling"] = rolling_row(args.rolling)
    table = render(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(table)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    return 0


def rolling_row(rounds: int) -> dict[str, Any]:
    """The rolling restart's report, also written to rolling.{md,json}; or why it was skipped."""
    why = "--rolling 0" if rounds < 1 else rolling.missing()
    if why is not None:
        print(f"rolling restart under traffic: skipped ({why})", file=sys.stderr, flush=True)
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="bench-rolling-") as tmp:
        report = rolling.run(rounds, Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rolling.md").write_text(rolling_markdown(report))
    (RESULTS / "rolling.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def render(report: dict[str, Any]) -> str:
    """latest.md: the main table, then the rolling restart's (or why it was skipped)."""
    table = markdown(report)
    row = report.get("rolling")
    if row is None:
        return table
    if "skipped" in row:
        return table + f"\nRolling restart under traffic: skipped ({row['skipped']}).\n"
    return table + "\n" + rolling_markdown(row)


def only_rolling(rounds: int) -> int:
    """`--only rolling`: the row alone; merged into latest.json and latest.md rendered again."""
    report = rolling_row(rounds)
    if "skipped" in report:
        return 1
    print(rolling_markdown(report))
    latest = RESULTS / "latest.json"
    if latest.exists():
        merged = json.loads(latest.read_text())
        merged["rolling"] = report
        latest.write_text(json.dumps(merged, indent=2) + "\n")
        (RESULTS / "latest.md").write_text(render(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
