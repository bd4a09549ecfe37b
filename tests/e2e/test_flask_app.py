"""examples/flask: the Flask docs' Celery pattern plus stopright's lines: a busy stop, RabbitMQ + PostgreSQL.

The app (issue 14, point 4) is what most users have: ``create_app()``,
``celery_init_app(app)`` with a ``FlaskTask`` whose ``__call__`` runs
``self.run`` inside the app context, ``config_from_object`` after
``stopright.install``, ``@shared_task(bind=True)`` reporting ``PROGRESS``,
Flask-SQLAlchemy registered in the app factory (so the Celery MainProcess
registers it before the pool forks), and Celery's database result backend.
Long jobs (longer than the 3 s grace) and a request stream run when Ctrl+C
comes. Checked: no 5xx, no reset, no SIGKILL (honcho's, or the worker's own
of a pool child that did not hand back), beat on stopright's scheduler with
its stop sequence, nothing left running, every running job handed back and
shown ``PENDING`` by the result backend while the set is down, every
accepted job succeeded after a restart, and both servers' logs: no
connection ended abruptly (PostgreSQL ``unexpected EOF``, RabbitMQ ``client
unexpectedly closed TCP connection``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.e2e import examples
from tests.e2e.examples import example_sets, load_result, run_load, start_ready
from tests.e2e.test_rabbitmq import assert_every_connection_closed_properly, held_connections
from tests.procset import ROOT, ProcessSet
from tests.rabbitmq_node import Vhost
from tests.servers import PostgresServer

EXAMPLE = ROOT / "examples" / "flask"
PROCESSES = ("web", "worker", "beat")
LONG_JOBS, LONG_SECONDS = 4, 15  # each outlives the 3 s grace, whatever the start costs
ABRUPT_PG = "unexpected EOF"


@pytest.fixture
def flask_sets(tmp_path: Path, postgres: PostgresServer,
               rabbitmq: Vhost) -> Iterator[Callable[[], ProcessSet]]:
    """Sets of examples/flask on one PostgreSQL database and one RabbitMQ vhost, killed by pid."""
    (tmp_path / "var").mkdir()  # beat's schedule file
    env = {"FLASK_SQLALCHEMY_DATABASE_URI": postgres.url, "FLASK_CELERY__broker_url": rabbitmq.url,
           "FLASK_CELERY__result_backend": "db+" + postgres.url,
           "WEB_CONCURRENCY": "2", "WORKER_CONCURRENCY": str(LONG_JOBS)}
    init = subprocess.run([sys.executable, "-m", "flask", "--app", "jobapp", "init-db"], cwd=EXAMPLE,
                          env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    yield from example_sets(tmp_path, env, EXAMPLE)


def wait_queued(rabbitmq: Vhost, count: int, timeout: float = 30) -> None:
    """Until ``count`` messages wait in Celery's queue: every pool child is busy and the stream flows."""
    deadline = time.monotonic() + timeout
    while rabbitmq.node.queue_depth(rabbitmq.name, "celery") < count:
        assert time.monotonic() < deadline, "the request stream's jobs did not queue up"
        time.sleep(0.2)


def stored_states(postgres: PostgresServer, ids: list[str]) -> dict[str, str]:
    """Each task's state in Celery's database result backend (no row: PENDING), read with the set down."""
    url = postgres.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, connect_timeout=10) as conn:
        rows = dict(conn.execute("SELECT task_id, status FROM celery_taskmeta WHERE task_id = ANY(%s)",
                                 (ids,)).fetchall())
    return {task_id: rows.get(task_id, "PENDING") for task_id in ids}


def assert_stopped_right(ps: ProcessSet, rc: int) -> None:
    examples.assert_stopped_right(ps, rc, PROCESSES)


def test_flask_pattern_busy_ctrl_c_on_rabbitmq_and_postgres(flask_sets, postgres: PostgresServer,
                                                           rabbitmq: Vhost) -> None:
    pg_log_start = len(postgres.log_text())
    ps = flask_sets()
    start_ready(ps)
    # install() before config_from_object: beat still runs stopright's scheduler.
    assert ". scheduler -> stopright.celery_beat.Scheduler" in "\n".join(ps.lines("beat")), ps.output
    assert "will not be handed back" not in ps.output, ps.output

    long_jobs = [ps.submit("sleep", seconds=LONG_SECONDS) for _ in range(LONG_JOBS)]
    for job_id in long_jobs:  # PROGRESS, from update_state in the bound task
        ps.wait_status(job_id, "running", timeout=60)
    loader = run_load(ps)
    try:
        wait_queued(rabbitmq, 20)
        held = held_connections(ps, rabbitmq)
        rc, stop_seconds = ps.stop_and_wait("ctrl_c", timeout=30)
    finally:
        result = load_result(loader)

    assert_stopped_right(ps, rc)
    for job_id in long_jobs:  # FlaskTask's own __call__ runs self.run: handed back all the same
        assert f"task jobapp.tasks.run_job[{job_id}] handed back to the queue" in ps.output, ps.output
    assert "WorkerLostError" not in ps.output and "Traceback" not in ps.output, ps.output
    # The database handler registered in create_app() (the MainProcess, before the fork) closed
    # each pool child's own connections.
    child_closes = [line for line in ps.lines("worker")
                    if re.search(r"ForkPoolWorker-\d+\] closing database", line)]
    assert len(child_closes) >= LONG_JOBS, ps.lines("worker")
    # While the set is down, a status page shows the handed-back jobs waiting, not in progress.
    assert stored_states(postgres, long_jobs) == dict.fromkeys(long_jobs, "PENDING"), ps.lines("worker")
    pg_abrupt = postgres.log_text()[pg_log_start:].count(ABRUPT_PG)
    assert pg_abrupt == 0, postgres.log_text()[pg_log_start:]
    amqp = assert_every_connection_closed_properly(rabbitmq, held)

    accepted = [*long_jobs, *result["accepted"]]
    print(f"stop {stop_seconds:.2f} s, requests {result['outcomes']}, {len(accepted)} jobs accepted, "
          f"{LONG_JOBS} handed back, 0 SIGKILL, PostgreSQL abrupt closes {pg_abrupt}, "
          f"RabbitMQ connections {len(amqp)}, abrupt 0")
    again = flask_sets()
    start_ready(again)
    restarted = time.monotonic()
    for job_id in accepted:  # a handed-back job runs again from the start
        again.wait_status(job_id, "succeeded", timeout=LONG_SECONDS + 60)
    print(f"every accepted job succeeded {time.monotonic() - restarted:.1f} s after the restart: 0 lost")
    held = held_connections(again, rabbitmq)
    rc, _ = again.stop_and_wait("ctrl_c", timeout=30)
    assert_stopped_right(again, rc)
    assert postgres.log_text()[pg_log_start:].count(ABRUPT_PG) == 0, postgres.log_text()[pg_log_start:]
    assert_every_connection_closed_properly(rabbitmq, held)
