"""The Celery application: broker, delivery guarantees and the beat schedule.

Every setting that matters for shutdown carries its reason. The short
version: a message is acknowledged only after its job ran, a pool child
that dies gives its message back instead of failing it, and the worker
holds no more messages than it is running, so a stop hands back at most
one message per pool child and loses none.
"""

from __future__ import annotations

import sys

from celery import Celery, signals

from core import logs, outages
from core.config import get_settings

settings = get_settings()
# A Redis that cannot write its AOF (disk full) answers MISCONF: a connection error, so the
# worker's consumer reconnects with backoff instead of dying of it (core/outages.py).
outages.redis_refusals_are_connection_errors()

celery_app = Celery("tasks")
celery_app.conf.update(
    broker_url=settings.broker_url,
    broker_connection_retry_on_startup=True,
    # An outage of any length must not end the worker (Celery's default: give up after 100
    # reconnection attempts and exit, which stops the whole set under honcho; at the pace of
    # tasks/consumer.py, 100 attempts are about 3 minutes) ...
    broker_connection_max_retries=None,
    # ... and a broker that is back is found again within 2 s (tasks/consumer.py).
    worker_consumer="tasks.consumer:Consumer",
    # Publishing (POST /jobs, the sweeper) tries the broker once instead of retrying for about
    # 6 s: a job whose publish fails is stored anyway and published by the outbox relay
    # (jobs/outbox.py). The socket timeouts bound a connect to, and a command on, a broker
    # that stopped answering (Redis transport; an AMQP connection ignores them). A stopping
    # worker's consumer waits for its pending BRPOP before it closes: 0.5 s at most, not
    # kombu's 1 s (the Redis transport takes its BRPOP timeout from ``polling_interval``;
    # tasks/lifecycle.py gives the whole close 1 s).
    broker_transport_options={"max_retries": 0, "socket_connect_timeout": 1, "socket_timeout": 2,
                              "polling_interval": 0.5},
    # The job ledger (database) holds states and results; no result backend.
    task_ignore_result=True,
    # Ack after the run: a run cut short by a stop leaves its message unacked,
    # and kombu puts unacked messages back on the queue when the channel closes.
    task_acks_late=True,
    # A pool child killed mid-run (SIGKILL, OOM) requeues its message instead
    # of acking it as FAILURE. The ledger bounds retries (JOB_MAX_ATTEMPTS).
    task_reject_on_worker_lost=True,
    # Reserve one message per pool child at most: nothing waits in a stopping
    # worker's memory while another worker could run it.
    worker_prefetch_multiplier=1,
    worker_concurrency=settings.worker_concurrency,
    # Celery's prefork pool with a stop that ends when the pool has drained
    # (stock sleeps up to 0.5 s more, twice): tasks/pool.py.
    worker_pool="tasks.pool:TaskPool",
    # Lost broker connection: let running jobs finish. Cancelling them would
    # SIGTERM pool children, which ignore it (tasks/lifecycle.py). Their acks
    # die with the connection, the messages are redelivered, and the ledger's
    # claim drops the copies of finished jobs. (Celery warns that 6.0 will
    # default to True; this stays False on purpose.)
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # Keep our one log format (core/logs.py); Celery must not replace it.
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    # Off by default anyway; stated because a soft shutdown sleeps its whole
    # timeout even when the tasks finish early. tasks/lifecycle.py bounds the
    # warm shutdown instead.
    worker_soft_shutdown_timeout=0,
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
