"""A lost broker connection never runs a task twice at the same time (issue 14, code-read list).

An app without a job ledger (tests/e2e/edgeapp.py: stopright's lines only) on
RabbitMQ, with a task acknowledged late running when RabbitMQ closes the
worker's connection (``rabbitmqctl close_connection``). RabbitMQ puts the
unacknowledged message back on the queue at once; the worker reconnects and
gets it again. Each run notes its start and end in a file, so the test counts
the runs of the task and whether two overlapped.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.test_worker_edges import APP, send, worker
from tests.rabbitmq_node import Vhost

SECONDS = 8


def runs(ledger: Path, task_id: str) -> list[tuple[float, float | None]]:
    """(start, end) of each run of ``task_id``, end None while it runs."""
    started: dict[str, float] = {}
    out = []
    for line in ledger.read_text().splitlines() if ledger.exists() else []:
        what, tid, pid, at = line.split()
        if tid != task_id:
            continue
        if what == "start":
            started[pid] = float(at)
        else:
            out.append((started.pop(pid), float(at)))
    return out + [(at, None) for at in started.values()]


def finished(spans: list[tuple[float, float | None]]) -> bool:
    return len(spans) >= 2 and all(end is not None for _, end in spans)


def overlapping(spans: list[tuple[float, float | None]]) -> int:
    ordered = sorted(spans)
    return sum(1 for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False)
               if end is None or start < end)


def test_a_lost_connection_hands_the_running_task_back_instead_of_running_it_twice(
        tmp_path: Path, rabbitmq: Vhost) -> None:
    ledger = tmp_path / "runs"
    ps = worker(tmp_path, rabbitmq.url, concurrency=2, EDGE_LEDGER=str(ledger))  # a child free for a 2nd run
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60)
        task_id = send(rabbitmq.url, SECONDS)
        ps.wait_for_line(rf"edgeapp task {task_id} started", timeout=30)
        for line in rabbitmq.node.ctl("list_connections", "-p", rabbitmq.name, "--quiet",
                                      "--no-table-headers", "pid").splitlines():
            if line.strip():
                rabbitmq.node.ctl("close_connection", line.strip(), "closed by the test")
        deadline = time.monotonic() + SECONDS + 60
        while not finished(runs(ledger, task_id)):  # the redelivered run, and any other, ended
            assert time.monotonic() < deadline, (runs(ledger, task_id), ps.output[-4000:])
            time.sleep(0.1)
        rc, _ = ps.stop_and_wait("sigterm", timeout=30)
    finally:
        ps.cleanup()
    spans = runs(ledger, task_id)
    out = ps.output
    assert overlapping(spans) == 0, (spans, out)
    assert f"task {APP}.sleep[{task_id}] handed back to the queue" in out, out
    assert "Traceback" not in out, out
    assert rc == 0, out
    print(f"RabbitMQ connection closed under a running late-ack task: {len(spans)} runs, "
          f"{overlapping(spans)} overlapping; the last one finished "
          f"{spans[-1][1] - spans[-1][0]:.1f} s after it started")
