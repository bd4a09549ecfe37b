"""Several hosts behind HAProxy (tests/hosts.py): a rolling restart, a host lost or cut off, beat on both.

Hosts ``a`` and ``b`` run the whole Procfile under honcho, with PostgreSQL and
RabbitMQ on host ``db`` and HAProxy (deploy/haproxy.cfg as shipped; nginx from
deploy/nginx-upstream.conf for one rolling restart) on ``lb``, each host a
network namespace of its own. What users meet when they outgrow
one machine: a deploy must cost no request and no job, a job handed back by a
stopping host runs at once on the other, and a host that dies or is cut off
never leaves a job stranded or runs it twice at once.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import hostload, hostruns, hosts
from tests.rabbitmq_node import find_rabbitmq
from tests.servers import find_pg_bin, missing


@pytest.fixture(params=["rabbitmq"])
def bed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[hosts.Bed]:
    """The bed with RabbitMQ on host db and HAProxy on lb; ``parametrize("bed", [...], indirect=True)``
    picks Redis, or a ``(broker, balancer)`` pair such as ``("redis", "nginx")``."""
    broker, balancer = (request.param, "haproxy") if isinstance(request.param, str) else request.param
    if os.geteuid() != 0 or shutil.which("ip") is None:
        missing("network namespaces need root and iproute2", "REQUIRE_NAMESPACES")
    if shutil.which(balancer) is None and not os.access(f"/usr/sbin/{balancer}", os.X_OK):
        missing(f"{balancer} is not installed", f"REQUIRE_{balancer.upper()}")
    if find_pg_bin() is None:
        missing("no PostgreSQL server is installed", "REQUIRE_POSTGRES")
    if broker == "rabbitmq" and find_rabbitmq() is None:
        missing("no RabbitMQ server is installed", "REQUIRE_RABBITMQ")
    with hosts.bed(tmp_path, broker, balancer=balancer) as made:
        yield made


def start_both(bed: hosts.Bed) -> tuple[hosts.HostSet, hosts.HostSet]:
    a, b = bed.start_host("a"), bed.start_host("b")
    for host in (a, b):
        host.wait_started()
        bed.wait_in_balancer(host.name)
    return a, b


def told(bed: hosts.Bed, runs: list[hostruns.Run]) -> list[str]:
    """Every line of either host naming a job that ran more than once: for a failure's message."""
    again = {run.job for run in runs if sum(r.job == run.job for r in runs) > 1}
    return [f"{name}: {line}" for name, host in bed.hosts.items() for line in host.lines()
            if any(job in line for job in again)]


def no_sigkill(host: hosts.HostSet) -> None:
    assert not [line for line in host.lines("system") if "SIGKILL" in line], "\n".join(host.lines("system"))


def running_on(host: hosts.HostSet, count: int, timeout: float = 60) -> list[str]:
    """Until ``count`` jobs run on ``host`` (started, not ended); their ids."""
    deadline = time.monotonic() + timeout
    while True:
        running = [run.job for run in host.runs() if run.ended is None]
        if len(running) >= count:
            return running
        assert time.monotonic() < deadline, f"only {len(running)} job(s) running on host {host.name}"
        time.sleep(0.1)


BROKERS = pytest.mark.parametrize("bed", ["rabbitmq", "redis"], indirect=True)


@pytest.mark.parametrize("bed", ["rabbitmq", "redis", pytest.param(("redis", "nginx"), id="redis-nginx")],
                         indirect=True)
def test_a_rolling_restart_under_traffic_costs_no_request_and_no_job(bed: hosts.Bed) -> None:
    """32 clients through HAProxy (retries off) or nginx; host a stopped with SIGTERM and back, then b.

    Every request is answered (no 5xx, reset, refused or timeout), every
    accepted job succeeds exactly once, and each job running past the grace
    at a stop is handed back and runs next on the other host, before the
    stopped one is back.
    """
    a, b = start_both(bed)
    load = hostload.Load(bed)
    load.start()
    load.wait_accepted(30)
    back_at: dict[str, float] = {}
    for host in (a, b):
        host.restart()
        back_at[host.name] = hostruns.now_clock()
        load.wait_accepted(20)
    record = load.finish()
    runs = bed.runs()
    result = hostruns.summary(record, bed.jobs(), runs)

    assert result["requests"] == {"answered": len(record["requests"])}, result["requests"]
    assert (result["lost"], result["failed"], result["run_twice"], result["at_once"]) == (0, 0, 0, 0), (
        "\n".join([str(result), *hostruns.trouble(record, bed.jobs(), runs), *told(bed, runs)]))
    assert result["handed_back"] >= 1, "no job ran past the grace: nothing was tested"
    for handback in hostruns.handbacks(runs):
        assert handback.to_host not in (None, handback.from_host), handback
        next_run = min((r for r in runs if r.job == handback.job and r.host == handback.to_host),
                       key=lambda r: r.started)
        assert next_run.started < back_at[handback.from_host], (handback, back_at)
    for host in (a, b):
        no_sigkill(host)
    print(f"\nrolling restart ({bed.broker_kind}, {bed.balancer.name}): {result}")


@BROKERS
def test_a_host_lost_its_jobs_run_again_on_the_other_host_once_each(bed: hosts.Bed) -> None:
    """kill -9 of every process of host a and its cables pulled, while it runs jobs.

    The sweeper (beat on host b) takes each job back once its lease lapsed,
    and host b runs it, once: no job is stranded, none runs twice at once.
    """
    a, b = start_both(bed)
    ids = [bed.post_job(8) for _ in range(6)]
    lost = running_on(a, 2)
    a.kill()
    bed.net.link("a", "front", up=False)
    bed.net.link("a", "back", up=False)
    rows = bed.wait_jobs(ids, timeout=120)
    runs = bed.runs()

    assert {row["status"] for row in rows.values()} == {"succeeded"}, rows
    assert hostruns.at_once(runs) == []
    for job in lost:
        job_runs = [r for r in runs if r.job == job]
        assert [(r.host, r.end) for r in job_runs] == [("a", "killed"), ("b", "succeeded")], job_runs
    assert not bed.balancer.in_rotation("a")
    print(f"\nhost lost ({bed.broker_kind}), seconds from the kill: "
          + "; ".join(hostruns.story(runs, job, a.killed_at) for job in lost))


def test_a_host_cut_off_from_the_database_stops_its_runs_before_another_host_runs_them(
        bed: hosts.Bed) -> None:
    """Host a loses its cable to PostgreSQL and RabbitMQ for 20 s while it runs jobs; no process dies.

    Its runs stop themselves when their leases lapse, before host b runs those
    jobs again; nothing runs twice at once, nothing ends failed; once the cable
    is back, host a is back in the balancer and runs jobs again.
    """
    a, b = start_both(bed)
    ids = [bed.post_job(12) for _ in range(6)]
    cut = running_on(a, 2)
    cut_at = hostruns.now_clock()
    bed.net.link("a", "back", up=False)
    a.wait_for_line(r"stops itself: its lease lapsed", timeout=60, name="worker")
    bed.wait_in_balancer("a", up=False)  # its /readyz: database unreachable
    remaining = 20 - (hostruns.now_clock() - cut_at)
    if remaining > 0:
        time.sleep(remaining)  # the outage's length, not a proof of anything
    bed.net.link("a", "back", up=True)
    rows = bed.wait_jobs(ids, timeout=120)
    runs = bed.runs()

    assert {row["status"] for row in rows.values()} == {"succeeded"}, rows
    assert hostruns.at_once(runs) == [], hostruns.at_once(runs)
    for job in cut:
        job_runs = [r for r in runs if r.job == job]
        first = job_runs[0]
        assert (first.host, first.end) == ("a", "lease lapsed"), job_runs
        assert job_runs[-1].end == "succeeded" and job_runs[-1].started > first.ended, job_runs
    print("\nhost cut off, seconds from the cut: "
          + "; ".join(hostruns.story(runs, job, cut_at) for job in cut))
    bed.wait_in_balancer("a", up=True)
    later = [bed.post_job(0.2) for _ in range(8)]
    bed.wait_jobs(later)
    deadline = time.monotonic() + 60
    while not any(r.host == "a" and r.started > cut_at + 20 and r.end == "succeeded" for r in bed.runs()):
        assert time.monotonic() < deadline, "host a ran no job after its cable was back"
        bed.wait_jobs([bed.post_job(0.2) for _ in range(4)])


SWEEP = r"Sending due task requeue-stranded-jobs"


def test_beat_on_both_hosts_sweeps_once_per_interval_and_fails_over_when_its_host_stops(
        bed: hosts.Bed) -> None:
    """Both hosts run beat (the Procfile as is): one leads (a lease in PostgreSQL), the other stands by.

    The sweep runs once per interval across both hosts, never from the standby;
    when the leading host is stopped (SIGTERM to its honcho) the other host's
    beat takes over and sweeps.
    """
    a, b = start_both(bed)
    deadline = time.monotonic() + 60
    while not (leaders := [h for h in (a, b) if any("leader: leading" in x for x in h.lines("beat"))]):
        assert time.monotonic() < deadline, "no beat leads"
        time.sleep(0.1)
    assert len(leaders) == 1, "both beats lead"
    leader = leaders[0]
    standby = b if leader is a else a
    swept = len(leader.lines("beat"))
    leader.wait_for_line(SWEEP, name="beat", after=swept)
    sweeps_before = len([x for x in leader.lines("beat") if SWEEP in x])
    deadline = time.monotonic() + 60
    while len([x for x in leader.lines("beat") if SWEEP in x]) < sweeps_before + 5:
        assert time.monotonic() < deadline, "the leader stopped sweeping"
        time.sleep(0.1)
    assert not [x for x in standby.lines("beat") if SWEEP in x], "the standby swept"
    interval = float(hosts.HOST_ENV["SWEEP_INTERVAL_SECONDS"])
    times = sorted(hostruns.clock(x) for h in (a, b) for x in h.lines("beat") if SWEEP in x)
    assert min(later - earlier for earlier, later in zip(times, times[1:], strict=False)) > interval / 2

    seen = len(standby.lines("beat"))
    leader.stop()
    took_over = standby.wait_for_line(r"leader: leading \(took over after", timeout=30, name="beat",
                                      after=seen)
    standby.wait_for_line(SWEEP, timeout=30, name="beat", after=seen)
    no_sigkill(leader)
    print(f"\nbeat on both hosts: {len(times)} sweeps from the leader only, at least "
          f"{min(b - a for a, b in zip(times, times[1:], strict=False)):.2f} s apart; {took_over}")
