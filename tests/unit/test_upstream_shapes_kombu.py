"""Upgrade-shape tests: every reach of stopright/upstream/kombu.py into kombu (and the Celery call into it).

One check per key of its ``REACHES``, against the installed kombu, with real objects where
they are cheap (a kombu pool on ``memory://``, a Message on a channel that refuses): the
private attributes of kombu's pools, the close with the protocol's handshake, how a refused
reject is reported, and the Redis transport's restore of an unacknowledged message (its
source: a real restore needs a Redis server, which tests/e2e/test_frozen_servers.py runs).
"""

from __future__ import annotations

import pytest
from kombu import Connection, pools
from kombu.connection import ConnectionPool
from kombu.message import Message
from kombu.resource import Resource
from kombu.transport import redis as kombu_redis

from stopright.upstream import kombu as K
from tests import shapes

CHECKS = shapes.Checks()
shape = CHECKS



def _pool() -> ConnectionPool:
    return ConnectionPool(Connection("memory://"), limit=2)


@shape(K, "kombu.resource.Resource._dirty")
def _(key: str) -> None:
    pool = _pool()
    shapes.check_attributes(key, pool, ["_dirty"])
    conn = pool.acquire()
    try:
        assert pool._dirty == {conn}, f"{key}: an acquired connection is not in Resource._dirty"
    finally:
        conn.release()
    assert not pool._dirty, f"{key}: a released connection is still in Resource._dirty"


@shape(K, "kombu.resource.Resource._resource")
def _(key: str) -> None:
    pool = _pool()
    shapes.check_attributes(key, pool, ["_resource"])
    shapes.check_attributes(key, pool._resource, ["queue"], what="Resource._resource (a LifoQueue)")
    assert len(pool._resource.queue) == 2, f"{key}: the free slots are not in Resource._resource.queue"
    assert not any(isinstance(r, Connection) for r in pool._resource.queue), \
        f"{key}: an unopened slot is a Connection now (close_pooled_connections would open it to close it)"
    conn = pool.acquire()
    conn.release()
    assert conn in pool._resource.queue, f"{key}: a released connection is not back in _resource.queue"


@shape(K, "kombu.resource.Resource._closed")
def _(key: str) -> None:
    shapes.check_text(key, Resource.force_close_all, ["if self._closed:\nreturn"],
                      "kombu's after-fork reset skips a pool marked closed (forget_inherited)")
    pool = _pool()
    conn = pool.acquire()
    held = K._empty(pool)
    assert conn in held and not pool._dirty and not pool._resource.queue, key
    with pytest.raises(RuntimeError):
        pool.acquire()  # a publish racing the stop fails at once
    pool._dirty.add(conn)
    pool.force_close_all()
    assert conn in pool._dirty, f"{key}: force_close_all no longer returns at once on a closed pool"


@shape(K, "kombu.Connection._close")
def _(key: str) -> None:
    shapes.check_signature(key, Connection._close, "self")
    shapes.check_calls(key, Connection.release, ["self._close()"], "release() outside a pool is _close()")
    conn = Connection("memory://")
    conn.connect()
    conn._close()
    assert not conn.connected, f"{key}: Connection._close() left the connection open"


@shape(K, "kombu.pools.connections / kombu.pools.producers")
def _(key: str) -> None:
    shapes.check_attributes(key, pools, ["connections", "producers"])
    for group in (pools.connections, pools.producers):
        assert isinstance(group, dict), f"{key}: {type(group).__name__} is no dict of pools any more"
    assert isinstance(pools.connections.create(Connection("memory://"), 2), Resource), key
    assert issubclass(pools.ProducerPool, Resource), key


# -- a requeue the broker refused (stopright/requeue.py) -----------------------------------------


@shape(K, "celery Request.reject -> kombu.Message.reject_log_error")
def _(key: str) -> None:
    from stopright.upstream.checks_kombu import reject_reporter

    reject_reporter(key)

    class Refusing:
        no_ack_consumers = None

        def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
            raise ConnectionError("broker down")

    reports: list[tuple] = []

    class Reporter:
        def critical(self, *args: object, **kwargs: object) -> None:
            reports.append(args)

    message = Message(body=b"{}", delivery_tag="tag-1", channel=Refusing())
    message.reject_log_error(Reporter(), (ConnectionError,), requeue=True)  # must not raise
    if len(reports) != 1 or reports[0][1:2] != ("tag-1",) or not isinstance(reports[0][2], ConnectionError):
        shapes.fail(key, f"kombu changed Message.reject_log_error: it reported {reports}",
                    "stopright/requeue.py _RefusedRequeue.critical(message, delivery_tag, error) expects "
                    "one critical() with the tag and the error; re-read it")


@shape(K, "kombu.transport.redis.QoS.restore_by_tag")
def _(key: str) -> None:
    shapes.check_signature(key, kombu_redis.QoS.restore_by_tag, "self, tag, client, leftmost")
    shapes.check_text(key, kombu_redis.QoS.restore_by_tag,
                      ["p = pipe.hget(self.unacked_key, tag)", "pipe.multi()",
                       "self._remove_from_indices(tag, pipe)", "if p:",
                       "self.channel._do_restore_message(M, EX, RK, pipe, leftmost)",
                       "client.transaction(restore_transaction, self.unacked_key)"],
                      "the unacked message is taken out and pushed back in one WATCH/MULTI transaction")
    shapes.check_text(key, kombu_redis.QoS.reject, ["self.restore_by_tag(delivery_tag, leftmost=True)"],
                      "a reject with requeue restores leftmost: stopright's restore does the same")


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "key"), CHECKS.cases(), ids=[key for _, key in CHECKS.cases()])
def test_upstream_shape(module: str, key: str) -> None:
    CHECKS.run(module, key)


def test_every_reach_has_a_shape_check() -> None:
    problems = CHECKS.problems({"stopright.upstream.kombu"})
    assert not problems, "\n".join(problems)
