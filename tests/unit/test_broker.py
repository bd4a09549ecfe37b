"""core/broker.py without a broker: closing kombu's pools, forgetting them across fork, readiness.

kombu's in-memory transport stands in for the broker's connections here;
the AMQP close handshake itself is checked against a real RabbitMQ in
tests/e2e/test_rabbitmq.py.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from billiard import util
from kombu import Connection, pools

import core.config
from core import broker
from core.celery_app import celery_app
from stopright.upstream import kombu as kombu_internals


@pytest.fixture
def memory_pool() -> Iterator[object]:
    pools.connections.clear()
    pools.producers.clear()
    pool = pools.connections[Connection("memory://")]
    yield pool
    pools.connections.clear()
    pools.producers.clear()
    celery_app.close()  # drops the app's cached pool, if a test made one


def test_every_pooled_connection_is_closed_and_the_pool_refuses_new_ones(memory_pool):
    in_use, returned = memory_pool.acquire(), memory_pool.acquire()
    for conn in (in_use, returned):
        conn.connect()
    returned.release()  # back in the pool, still open
    producer_pool = pools.producers[Connection("memory://")]
    held_producer = producer_pool.acquire()
    assert all(c.connected for c in (in_use, returned, held_producer.connection))

    kombu_internals.close_pooled_connections()

    assert not any(c.connected for c in (in_use, returned, held_producer.connection))
    with pytest.raises(RuntimeError):  # a late publish fails instead of opening a connection
        memory_pool.acquire()
    with pytest.raises(RuntimeError):
        producer_pool.acquire()


def test_a_forked_child_forgets_its_parents_pools_without_closing_them(memory_pool):
    conn = memory_pool.acquire()
    conn.connect()
    _ = celery_app.pool  # Celery's own cached pool, as after a publish
    kombu_internals.forget_inherited_in_forks()  # as gunicorn's master and Celery's MainProcess do
    pid = os.fork()
    if pid == 0:  # the child: nothing of the parent's is left to use or close
        forgotten = not pools.connections and not pools.producers and celery_app._pool is None
        util._run_after_forkers()  # what billiard runs next in a pool child: kombu's own reset
        untouched = conn.connected  # kombu's reset would have collected (shut down) it
        os._exit(0 if forgotten and untouched else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert conn.connected and memory_pool in pools.connections.values()  # the parent's: intact


@pytest.fixture
def amqp_broker(monkeypatch):
    """BROKER_URL at a local port; yields the listening socket (accepts, never answers)."""
    listener = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("BROKER_URL", f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}//")
    core.config.get_settings.cache_clear()
    yield listener
    listener.close()
    core.config.get_settings.cache_clear()
    broker._probe = None


def test_readiness_says_no_when_amqp_broker_refuses(amqp_broker):
    amqp_broker.close()  # nothing listens: refused
    assert broker.ping() is False
    assert broker.wait_until_up(timeout=0.2) is False


def test_readiness_says_no_when_amqp_broker_is_silent(amqp_broker):
    # Connected, never a word back: the ping gives up after its timeout instead of hanging.
    answers = []
    thread = threading.Thread(target=lambda: answers.append(broker.ping()), daemon=True)
    thread.start()
    thread.join(10)
    assert answers == [False]
