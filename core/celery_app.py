"""The Celery application, shared by web (publishing), the worker and beat: broker, queue, schedule.

The settings a stop depends on (acknowledged late, requeued when a pool
child dies, one message per child, the pool and consumer without fixed
sleeps) are set by ``stopright.install`` in the worker (tasks/worker.py),
each with its reason in stopright/settings.py. Every task's base class
is ``stopright.HandBackTask``: a task still running when the grace ends
goes back to the queue.
"""

from __future__ import annotations

import sys

from celery import Celery, signals

from core import logs, outages
from core.config import get_settings
from stopright.handback import HandBackTask

settings = get_settings()
# A Redis that cannot write its AOF (disk full) answers MISCONF: a connection error, so the
# worker's consumer reconnects with backoff instead of dying of it (core/outages.py).
outages.redis_refusals_are_connection_errors()

celery_app = Celery("tasks", task_cls=HandBackTask)
celery_app.conf.update(
    broker_url=settings.broker_url,
    broker_connection_retry_on_startup=True,
    # An outage of any length must not end the worker (Celery's default: give up after 100
    # reconnection attempts and exit, which stops the whole set under honcho; at the pace of
    # stopright/upstream/celery.py, 100 attempts are about 3 minutes) ...
    broker_connection_max_retries=None,
    # (and a broker that is back is found again within 2 s: stopright's consumer).
    # Publishing (POST /jobs, the sweeper) tries the broker once instead of retrying for about
    # 6 s: a job whose publish fails is stored anyway and published by the outbox relay
    # (jobs/outbox.py). The socket timeouts bound a connect to, and a command on, a broker
    # that stopped answering (Redis transport; an AMQP connection ignores them). A stopping
    # worker's consumer waits for its pending BRPOP before it closes: 0.5 s at most, not
    # kombu's 1 s (the Redis transport takes its BRPOP timeout from ``polling_interval``;
    # stopright/worker_stop.py gives the whole close 1 s).
    broker_transport_options={"max_retries": 0, "socket_connect_timeout": 1, "socket_timeout": 2,
                              "polling_interval": 0.5},
    # RabbitMQ goes on delivering to a dead host's consumer (power lost, cable cut: no FIN, no
    # RST) until it misses its heartbeats; the jobs it sends there wait, and so do those it holds
    # unacked. Celery's default, 120 s, stranded a lost host's jobs for minutes; with 10 s
    # RabbitMQ closes that connection and requeues them within about 20 s (docs/several-hosts.md).
    broker_heartbeat=10,
    # (A worker that reconnects after a network cut must find its remote-control queue free:
    # control_queue_exclusive=False, set by stopright.install.)
    # The job ledger (database) holds states and results; no result backend.
    task_ignore_result=True,
    # (Acks late, requeue on a lost child, prefetch 1: stopright.install. A job whose message
    # comes twice is dropped by the ledger's claim; the ledger bounds retries, JOB_MAX_ATTEMPTS.)
    worker_concurrency=settings.worker_concurrency,
    # Keep our one log format (core/logs.py); Celery must not replace it.
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    task_default_queue="jobs",
    beat_schedule={
        # Not a message: beat runs the sweep itself, in its sweeper thread (jobs/sweeper.py),
        # so a busy queue cannot starve it.
        "requeue-stranded-jobs": {
            "task": "jobs.requeue_stranded",
            "schedule": settings.sweep_interval_seconds,
        },
    },
    beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
    beat_scheduler="tasks.beat:Scheduler",
)


@signals.setup_logging.connect
def _setup_logging(**_: object) -> None:
    """Worker and beat: our one log format instead of Celery's."""
    logs.configure("worker" if "worker" in sys.argv[1:] else "beat")
