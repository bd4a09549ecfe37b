"""The worker's consumer, reconnecting to a broker that came back within seconds.

Celery's consumer retries a lost broker connection 2, 4, 6 ... seconds apart,
up to 30 s between tries (kombu's ``ensure_connection`` defaults, not a
setting): after a 6 s Redis outage the worker came back 6 s after Redis
did, and after a longer one up to 30 s later, while the jobs stored meanwhile
were already published (tasks/outbox.py). Here the tries are
:data:`RETRY_START_SECONDS` apart, growing to :data:`RETRY_MAX_SECONDS`. A try
against a broker that refuses connections costs microseconds. Selected by
``worker_consumer`` in tasks/celery_app.py; Celery's own code is unchanged.
"""

from __future__ import annotations

import functools

from celery.worker.consumer import Consumer as CeleryConsumer

RETRY_START_SECONDS = 0.5
RETRY_STEP_SECONDS = 0.5
RETRY_MAX_SECONDS = 2.0


class Consumer(CeleryConsumer):
    def ensure_connected(self, conn):
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=RETRY_START_SECONDS,
            interval_step=RETRY_STEP_SECONDS, interval_max=RETRY_MAX_SECONDS)
        return super().ensure_connected(conn)
