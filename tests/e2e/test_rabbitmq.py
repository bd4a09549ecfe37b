"""BROKER_URL=amqp://...: the set on RabbitMQ (issue 7, points 7 and 9).

A private RabbitMQ node (tests/servers.py) serves the whole session; each
test has a vhost of its own, so the node's log tells, per test, how every
connection of the set ended: ``closing AMQP connection`` after AMQP's close
handshake, or ``client unexpectedly closed TCP connection``. Before each
stop, the test records which process of the set holds which connection
(its client port), so a connection that is missing or closed badly is
named with its owner.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections import Counter

import psutil
import pytest

from tests.e2e.checks import assert_clean_stop, assert_handed_back_jobs_run, ran_again
from tests.e2e.conftest import Vhost
from tests.e2e.test_direct_ctrl_c import queue_job
from tests.procset import ProcessSet
from tests.rabbitmq_node import AmqpConnection

FAST_SWEEP = {"SWEEP_INTERVAL_SECONDS": "1", "JOB_QUEUED_LEASE_SECONDS": "2"}


def _role(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    parent = process.parent()
    parent_argv = parent.cmdline() if parent else []
    # The `sh -c` honcho runs each line in names the program too: not a parent of its kind.
    parent_command = "" if parent_argv[1:2] == ["-c"] else " ".join(parent_argv)
    if "gunicorn" in command:
        return "web worker" if "gunicorn" in parent_command else "web master"
    if "celery" in command and " worker" in command:
        return "pool child" if "celery" in parent_command else "worker"
    if "celery" in command and " beat" in command:
        return "beat"
    return command


def held_connections(ps: ProcessSet, vhost: Vhost) -> dict[int, str]:
    """Client port -> "role pid" of every connection the set holds to RabbitMQ right now."""
    held = {}
    for process in ps.snapshot():
        try:
            owner = f"{_role(process)} {process.pid}"
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in connections:
            if conn.raddr and conn.raddr.port == vhost.node.port and conn.status == psutil.CONN_ESTABLISHED:
                held[conn.laddr.port] = owner
    return held


def roles(held: dict[int, str]) -> Counter[str]:
    return Counter(owner.rsplit(" ", 1)[0] for owner in held.values())


def assert_every_connection_closed_properly(vhost: Vhost, held: dict[int, str],
                                            allowed_ends: tuple[str, ...] = ()) -> list[AmqpConnection]:
    """RabbitMQ's log: each connection to the vhost (those in ``held`` included) had a clean close.

    The server logs a client's end as it notices it, and writes its log
    asynchronously: wait (up to 15 s) until every connection has an end.
    """
    deadline = time.monotonic() + 15
    while True:
        connections = vhost.node.connections(vhost.name)
        seen = {c.client_port for c in connections}
        if (set(held) <= seen and all(c.end for c in connections)) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    log = "\n".join(line for line in vhost.node.log_text().splitlines() if vhost.name in line)
    missing = {port: owner for port, owner in held.items() if port not in seen}
    assert not missing, f"connections of the set not in RabbitMQ's log: {missing}\n{log}"
    bad = [(c, held.get(c.client_port, "?")) for c in connections
           if not c.clean and c.end not in allowed_ends]
    assert not bad, f"not closed properly (connection, owner): {bad}\n{log}"
    return connections


def rabbitmq_set(procset: ProcessSet, vhost: Vhost, **env: str) -> ProcessSet:
    """The set on ``vhost``, up, beat's connection included (its first sweep is sent)."""
    ps = procset.make(**{"BROKER_URL": vhost.url, "SWEEP_INTERVAL_SECONDS": "1", **env})
    ps.start()
    ps.wait_ready()
    ps.wait_for_line(r"Sending due task requeue-stranded-jobs", name="beat")  # beat has connected
    assert "BROKER_URL is set: using that broker, no embedded broker to run" in ps.output
    assert not (ps.var / "redis.sock").exists()  # no Redis in this set at all
    return ps


@pytest.mark.parametrize(("how", "expected_rc"), [("ctrl_c", 130), ("sigterm", 143)])
def test_idle_set_on_rabbitmq_closes_every_connection(procset: ProcessSet, rabbitmq: Vhost,
                                                      how: str, expected_rc: int) -> None:
    ps = rabbitmq_set(procset, rabbitmq)
    held = held_connections(ps, rabbitmq)
    # The worker's consumer and event connections, a web worker's /readyz probe. Beat holds
    # none while its sweep has nothing to publish (it opens no producer of its own).
    assert {"worker", "web worker"} <= set(roles(held)), held
    rc, _ = ps.stop_and_wait(how)
    assert_clean_stop(ps, rc, expected_rc, nothing_to_close=("broker",))
    connections = assert_every_connection_closed_properly(rabbitmq, held)
    assert len(connections) >= len(held) >= 3, connections


def test_after_load_every_process_closes_its_connections(procset: ProcessSet, rabbitmq: Vhost) -> None:
    ps = procset.make(BROKER_URL=rabbitmq.url, **FAST_SWEEP)
    stranded = queue_job(ps.env, "echo", {"value": "swept"}, publish=False)  # the sweep republishes it
    ps.start()
    ps.wait_ready()
    ps.wait_for_line(r"Sending due task requeue-stranded-jobs", name="beat")  # beat has connected
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # web workers publish from several threads
        ids = list(pool.map(lambda i: ps.submit("echo", value=i), range(50)))
        jobs = list(pool.map(lambda job_id: ps.job(job_id, wait=30), ids))
    assert [j["status"] for j in jobs] == ["succeeded"] * 50, jobs
    assert ps.job(stranded, wait=30)["result"] == "swept"  # published again by beat's sweeper
    assert "requeued 1 stranded job(s): " + stranded in ps.output

    held = held_connections(ps, rabbitmq)
    assert {"worker", "beat", "web worker"} <= set(roles(held)), held
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130, nothing_to_close=("broker",))
    connections = assert_every_connection_closed_properly(rabbitmq, held)
    assert len(connections) >= len(held) >= 5, (connections, held)


def test_long_jobs_are_handed_back_to_rabbitmq_and_run_after_restart(procset: ProcessSet,
                                                                     rabbitmq: Vhost) -> None:
    ps = rabbitmq_set(procset, rabbitmq)
    running = [ps.submit("sleep", seconds=12) for _ in range(2)]
    for job_id in running:
        ps.wait_status(job_id, "running")
    waiting = ps.submit("echo", value={"after": "restart"})  # queued behind them
    held = held_connections(ps, rabbitmq)
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130, nothing_to_close=("broker",))
    assert ps.output.count("handed back to the queue") == 2, ps.output

    stored = ps.stored_jobs()
    for job_id in running:
        assert stored[job_id]["status"] == "queued", stored[job_id]
        assert stored[job_id]["attempts"] == 0
    # Rejected with requeue: the two handed back and the one waiting sit in RabbitMQ's queue.
    assert rabbitmq.node.queue_depth(rabbitmq.name, "jobs") >= 3
    assert_every_connection_closed_properly(rabbitmq, held)

    again = procset.make(BROKER_URL=rabbitmq.url)
    again.start()
    again.wait_ready()
    assert_handed_back_jobs_run(again, running, waiting)
    held = held_connections(again, rabbitmq)
    rc, _ = again.stop_and_wait("ctrl_c")
    assert_clean_stop(again, rc, 130, nothing_to_close=("broker",))
    assert not [j for j in again.stored_jobs().values() if j["status"] == "failed"]
    assert_every_connection_closed_properly(rabbitmq, held)


def test_rabbitmq_down_for_ten_seconds(procset: ProcessSet, rabbitmq: Vhost) -> None:
    ps = rabbitmq_set(procset, rabbitmq, **FAST_SWEEP)
    before = [ps.submit("echo", value=i) for i in range(5)]
    assert [ps.job(j, wait=30)["status"] for j in before] == ["succeeded"] * 5
    long = ps.submit("sleep", seconds=6)  # running while the broker goes away
    ps.wait_status(long, "running")

    rabbitmq.node.stop()
    try:
        down = time.monotonic()
        answers = []
        while time.monotonic() - down < 10:
            answers.append(ps.http("GET", "/readyz", timeout=5))
            assert ps.http("GET", "/healthz", timeout=5).status == 200
            time.sleep(0.5)
        posted = time.monotonic()
        during = ps.http("POST", "/jobs", {"task": "echo", "args": {"value": "during"}}, timeout=30)
        post_seconds = time.monotonic() - posted
    finally:
        rabbitmq.node.start()
    back = time.monotonic()
    assert answers and all(a.status == 503 for a in answers), answers
    assert all(any(r.startswith("broker") for r in a.body["reasons"]) for a in answers), answers
    assert during.status == 202, during  # stored, published by the web worker's relay once it is back
    assert ps.proc is not None and ps.proc.poll() is None, ps.output  # honcho did not stop the set
    assert not re.search(r"\| \w+\.1 stopped", ps.output), ps.output

    deadline = back + 60
    while ps.http("GET", "/readyz", timeout=5).status != 200:
        assert time.monotonic() < deadline, ps.output
        time.sleep(0.1)
    ready_after = time.monotonic() - back
    assert ps.wait_status(during.body["id"], "succeeded", timeout=60)["attempts"] == 1
    during_done_after = time.monotonic() - back
    after = [ps.submit("echo", value=f"after {i}") for i in range(5)]
    for job_id in [*before, *after, long]:
        job = ps.wait_status(job_id, "succeeded", timeout=60)
        assert job["attempts"] == 1, job  # none ran twice

    held = held_connections(ps, rabbitmq)
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130, nothing_to_close=("broker",))
    # Those open when the node stopped were closed by the server; every other one properly.
    connections = assert_every_connection_closed_properly(rabbitmq, held, allowed_ends=("node stopped",))
    assert [c for c in connections if c.end == "node stopped"], connections
    print(f"RabbitMQ down 10 s: /readyz {sorted({a.status for a in answers})} x{len(answers)},"
          f" POST during it {during.status} in {post_seconds:.2f} s; ready {ready_after:.1f} s after"
          f" the node was back, the job posted meanwhile done {during_done_after:.1f} s after;"
          f" connections: {len(connections)} ({sum(c.end == 'node stopped' for c in connections)}"
          f" ended by the node stop, the rest closed properly)")


def test_a_stop_while_rabbitmq_is_down_leaves_the_requeue_to_rabbitmq(procset: ProcessSet,
                                                                      rabbitmq: Vhost) -> None:
    """A hand-back whose reject cannot reach RabbitMQ needs no spool (stopright/requeue.py): the
    connection is gone, and RabbitMQ requeues the unacked messages of a closed connection itself."""
    no_sweep = {"JOB_LEASE_SECONDS": "600", "JOB_QUEUED_LEASE_SECONDS": "600"}
    ps = rabbitmq_set(procset, rabbitmq, **no_sweep)
    jobs = [ps.submit("sleep", seconds=10) for _ in range(2)]
    first_starts = [ps.wait_status(job_id, "running")["started_at"] for job_id in jobs]
    rabbitmq.node.stop()
    try:
        ps.wait_for_line(r"Connection to broker lost", timeout=30, name="worker")
        rc, stop_seconds = ps.stop_and_wait("ctrl_c", timeout=30)
    finally:
        rabbitmq.node.start()
    assert_clean_stop(ps, rc, 130, nothing_to_close=("broker",))
    assert "Couldn't reject" not in ps.output and "CRITICAL" not in ps.output, ps.output
    assert not list(ps.var.glob("refused-requeues*")), "nothing to spool on RabbitMQ"
    assert [ps.stored_jobs()[j]["status"] for j in jobs] == ["queued", "queued"]
    # The job task runs on through a lost connection (its ledger claim fences a second delivery:
    # hand_back_on_connection_loss=False), so the stop hands them back and the reject is refused.
    refused = [line for line in ps.lines("worker") if "requeue refused" in line]
    assert len(refused) == len(jobs) and all("RabbitMQ requeues" in line for line in refused), refused

    again = procset.make(BROKER_URL=rabbitmq.url, **no_sweep)
    again.start()
    again.wait_ready()
    ready = time.monotonic()
    for job_id, first_start in zip(jobs, first_starts, strict=True):
        assert ran_again(again, job_id, first_start)["attempts"] == 1
    print(f"\nCtrl+C with RabbitMQ down: stopped in {stop_seconds:.1f} s, 0 SIGKILL; the {len(jobs)} "
          f"handed-back jobs ran again {time.monotonic() - ready:.1f} s after the restart was ready",
          *refused, sep="\n")
    rc, _ = again.stop_and_wait("ctrl_c")
    assert rc == 130
