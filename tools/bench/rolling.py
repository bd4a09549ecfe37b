"""The rolling restart under traffic: two hosts behind one HAProxy, each stopped (SIGTERM) and started again.

The several-host bed of the end-to-end tests (tests/hosts.py: network namespaces
lb, db, a and b) and its clients (tests/hostload.py, 32 posting sleep jobs and
long-polling them), in the scenario of tests/e2e/test_several_hosts.py: load
flowing, host a stopped (SIGTERM to its honcho), started again and waited for
until HAProxy has it UP, then host b, then the load finished. Each restart
runs on fresh clients, so its figures are its own.

- This set: the Procfile on each host, PostgreSQL and RabbitMQ on db, HAProxy
  as deploy/haproxy.cfg ships (checks /readyz).
- The stock reference: its web, worker and beat on each host, one Redis on db,
  the same HAProxy but checking /healthz (it has no /readyz). Its job outcomes
  are the clients' record: a job never seen to end is lost.
- Each again with the HAProxy file's optional retry lines on (a refused
  connection retried on the other server; never a POST that was sent), and
  behind nginx (deploy/nginx-upstream.conf: passive checks only; a restarted
  host counts as back once its check path answers 200).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tests import hostload, hostruns, hosts
from tests.rabbitmq_node import find_rabbitmq
from tests.servers import find_pg_bin, redis_server_binary
from tools.bench.session import ROOT
from tools.bench.summary import machine

#: Each set behind HAProxy as deploy/haproxy.cfg ships (retries off), with its optional retry lines,
#: and behind nginx as deploy/nginx-upstream.conf ships.
KINDS = ("this set", "reference", "this set, retries on", "reference, retries on", "this set, nginx",
         "reference, nginx")
REFERENCE = ROOT / "tools" / "bench" / "reference"
ROUNDS = 3
FINISH_SECONDS = 30  # after the last restart, how long the clients follow their jobs (6 s at most)
WEB_PROCESSES = 2  # this set's default WEB_WORKERS; the reference's WEB_CONCURRENCY


def missing() -> str | None:
    """Why this row cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2)"
    if shutil.which("haproxy") is None:
        return "HAProxy is not installed"
    if find_pg_bin() is None:
        return "no PostgreSQL server is installed"
    if find_rabbitmq() is None:
        return "no RabbitMQ server is installed"
    try:
        redis_server_binary()
    except SystemExit:
        return "no Redis (or Valkey) server"
    return None


def reference_procfile(root: Path) -> Path:
    """The reference's Procfile without its `redis` entry (one Redis serves both hosts, on db)."""
    lines = [line for line in (REFERENCE / "Procfile").read_text().splitlines()
             if line.strip() and not line.startswith("redis:")]
    path = root / "Procfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def rolling_restart(kind: str, root: Path, rounds: int = ROUNDS) -> list[dict[str, Any]]:
    """``rounds`` rolling restarts of ``kind`` (KINDS) under traffic on one bed; each one's figures."""
    assert kind in KINDS, kind
    root.mkdir(parents=True, exist_ok=True)
    ours, retries = kind.startswith("this set"), kind.endswith("retries on")
    balancer = "nginx" if kind.endswith("nginx") else "haproxy"
    if ours:
        made = hosts.bed(root, balancer=balancer, retries=retries)
    else:
        made = hosts.bed(root, "redis", procfile=reference_procfile(root), directory=REFERENCE,
                         balancer=balancer, check="/healthz", retries=retries)
    with made as bed:
        if not ours:
            assert bed.redis is not None
            bed.host_env = {"REDIS_URL": bed.redis.url, "WEB_CONCURRENCY": str(WEB_PROCESSES),
                            "WORKER_CONCURRENCY": hosts.HOST_ENV["WORKER_CONCURRENCY"],
                            "PYTHONUNBUFFERED": "1"}
        for name in ("a", "b"):
            (root / name / "var").mkdir(parents=True, exist_ok=True)  # the reference's beat schedule
        pair = [bed.start_host("a"), bed.start_host("b")]
        for host in pair:
            host.wait_started()
            bed.wait_in_balancer(host.name)
        results = []
        for n in range(rounds):
            began = time.monotonic()
            result = one_restart(bed, kind, pair)
            results.append(result)
            print(f"rolling restart {n + 1}/{rounds} {kind}: {time.monotonic() - began:.0f} s, "
                  + ", ".join(f"{k}={v}" for k, v in result.items()), file=sys.stderr, flush=True)
        return results


def one_restart(bed: hosts.Bed, kind: str, pair: list[hosts.HostSet]) -> dict[str, Any]:
    """Host a, then host b: SIGTERM, start again, back in rotation; under fresh clients."""
    load = hostload.Load(bed, follow_for=FINISH_SECONDS)
    load.start()
    load.wait_accepted(30)
    stop_s, back_s, sigkills = {}, {}, 0
    for host in pair:
        stopped, back = host.restart()
        stop_s[host.name], back_s[host.name] = round(stopped, 2), round(back, 2)
        sigkills += sum("SIGKILL" in line for line in host.terminals[-2].texts("system"))
        load.wait_accepted(20)
    record = load.finish(timeout=FINISH_SECONDS + 60)
    ids = {job["id"] for job in record["jobs"]}
    latencies = [job["seen_end"] - job["posted"] for job in record["jobs"] if job["seen_end"]]
    figures: dict[str, Any] = {"requests": hostruns.outcomes(record), "accepted": len(ids)}
    if kind.startswith("this set"):
        summary = hostruns.summary(record, bed.jobs(), [run for run in bed.runs() if run.job in ids])
        waits = summary["handback_waits"]
        figures |= {"lost": summary["lost"], "failed": summary["failed"], "run_twice": summary["run_twice"],
                    "at_once": summary["at_once"], "handed_back": summary["handed_back"],
                    "handback_waits": [round(w, 3) for w in waits]}
    else:  # the clients' record: None is a job never seen to end
        figures |= {"lost": sum(job["status"] is None for job in record["jobs"]),
                    "failed": sum(job["status"] == "failed" for job in record["jobs"]),
                    "run_twice": None, "at_once": None, "handed_back": None, "handback_waits": None}
    return figures | {"stop_s": stop_s, "back_s": back_s, "sigkills": sigkills,
                      "longest_latency_s": round(max(latencies, default=0.0), 2)}


def run(rounds: int, root: Path) -> dict[str, Any]:
    """The row for every kind of set (KINDS), each one's restarts in turn."""
    began = time.monotonic()
    per_set = {kind: rolling_restart(kind, root / re.sub(r"\W+", "-", kind), rounds) for kind in KINDS}
    return {"finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "rounds": rounds,
            "minutes": (time.monotonic() - began) / 60, "machine": machine(),
            "settings": {"clients": hostload.Load.clients, "mix": hostload.Load.mix,
                         "finish_seconds": FINISH_SECONDS, "web_processes": WEB_PROCESSES,
                         "worker_concurrency": int(hosts.HOST_ENV["WORKER_CONCURRENCY"]),
                         "drain_seconds": float(hosts.HOST_ENV["SHUTDOWN_DRAIN_SECONDS"]),
                         "grace_seconds": float(hosts.HOST_ENV["SHUTDOWN_GRACE_SECONDS"])},
            "restarts": per_set, "rows": {kind: row(results) for kind, results in per_set.items()}}


def row(restarts: list[dict[str, Any]]) -> dict[str, Any]:
    """The N restarts of one set: counts summed, times ranged, hand-back delays over all of them."""
    requests: dict[str, int] = {}
    for result in restarts:
        for outcome, count in result["requests"].items():
            requests[outcome] = requests.get(outcome, 0) + count

    def total(key: str) -> int | None:
        values = [r[key] for r in restarts]
        return None if any(v is None for v in values) else sum(values)

    def span(values: list[float]) -> list[float] | None:
        return [min(values), max(values)] if values else None

    waits = None
    if restarts[0]["handback_waits"] is not None:
        every = sorted(w for r in restarts for w in r["handback_waits"])
        waits = [every[0], round(statistics.median(every), 3), every[-1]] if every else []
    return {"restarts": len(restarts), "requests": requests,
            **{key: total(key) for key in ("accepted", "lost", "failed", "run_twice", "at_once",
                                           "handed_back", "sigkills")},
            "handback_waits": waits,
            "stop_s": span([v for r in restarts for v in r["stop_s"].values()]),
            "back_s": span([v for r in restarts for v in r["back_s"].values()]),
            "longest_latency_s": max(r["longest_latency_s"] for r in restarts)}
