"""The Redis connection of this process that is not Celery's own.

Celery/kombu keep their broker connections in the app's connection and
producer pools (closed by ``celery_app.close()``, registered in
tasks/lifecycle.py). This module owns the one plain redis-py client used for
readiness checks and for waiting until the broker is up at start.
"""

from __future__ import annotations

import logging
import os
import time

import redis

from app import shutdown
from app.config import get_settings

log = logging.getLogger("broker")

_client: redis.Redis | None = None
_client_pid: int | None = None


def client() -> redis.Redis:
    global _client, _client_pid
    current = _client
    if current is None or _client_pid != os.getpid():
        # A client inherited across fork is dropped, not closed: redis-py's
        # pool notices the pid change and never reuses the parent's sockets.
        current = _client = redis.Redis.from_url(get_settings().redis_client_url,
                                                 socket_timeout=1, socket_connect_timeout=1)
        _client_pid = os.getpid()
        shutdown.current().register("redis client", close)  # closed at once if late
    return current


def close() -> None:
    global _client
    if _client is not None and _client_pid == os.getpid():
        _client.close()
        _client = None


def ping() -> bool:
    try:
        return bool(client().ping())
    except redis.RedisError:
        return False


def wait_until_up(timeout: float = 15.0) -> bool:
    """Block until the broker answers (it starts beside us under honcho)."""
    deadline = time.monotonic() + timeout
    probe = redis.Redis.from_url(get_settings().redis_client_url,
                                 socket_timeout=1, socket_connect_timeout=1)
    try:
        while True:
            try:
                probe.ping()
                return True
            except redis.RedisError:
                if time.monotonic() >= deadline:
                    log.error("broker at %s did not answer within %.0f s",
                              get_settings().redis_client_url, timeout)
                    return False
                time.sleep(0.05)
    finally:
        probe.close()
