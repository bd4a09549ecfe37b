"""kombu's connection and producer pools: closed properly at exit, forgotten after a fork.

Everything that publishes (a web worker, a pool child, beat, the worker's
MainProcess) goes through kombu's connection and producer pools, which
nothing closes: Celery's ``app.close()`` only forgets its pool, and kombu's
``force_close_all()`` drops each connection without AMQP's close handshake
(it is meant for after a fork). RabbitMQ then logs "client unexpectedly
closed TCP connection" for each. :func:`close_pooled_connections` closes
every pooled connection with the handshake; stopright registers it in each
process's shutdown registry (gunicorn workers, the Celery MainProcess and
pool children, beat).

Across a fork nothing is inherited: a child forgets its parent's pools
without closing them (an AMQP close from the child would end the parent's
connection, whose socket it shares) and opens its own
(:func:`forget_inherited`, run after each fork of a process that asked:
:func:`forget_inherited_in_forks`).
"""

from __future__ import annotations

import os
from typing import Any

from kombu import pools
from kombu.connection import Connection
from kombu.resource import Resource

from stopright.upstream import celery as celery_internals

#: What this module relies on that kombu does not promise (checked by tests/unit/test_upstream_shapes.py).
REACHES = {
    "kombu.resource.Resource._dirty": "the resources acquired from a pool (a set)",
    "kombu.resource.Resource._resource": "the free resources (a LifoQueue: .queue)",
    "kombu.resource.Resource._closed": "a pool marked closed: acquire fails, force_close_all returns",
    "kombu.Connection._close": "close with the protocol's handshake, what release() does outside a pool",
    "kombu.pools.connections / kombu.pools.producers": "the per-process pool groups (dicts of pools)",
    # stopright/requeue.py: a requeue the broker refused, done once it is back.
    "celery Request.reject -> kombu.Message.reject_log_error": (
        "Celery's reject calls its on_reject(logger, errors, requeue), the consumer's promise of "
        "message.reject_log_error, which reports a reject refused with a connection error as "
        "logger.critical(message, delivery_tag, error) and swallows it"),
    "kombu.transport.redis.QoS.restore_by_tag": (
        "one WATCH/MULTI transaction: the message a delivery tag names in the unacked hash back on its "
        "queue (leftmost: where a reject puts it), or nothing when it is no longer there"),
}


def close_pooled_connections() -> None:
    """Close every pooled kombu connection of this process, with a proper close.

    For RabbitMQ that is AMQP's ``connection.close`` / ``close-ok``; for
    Redis, the client's sockets. Every pooled connection, acquired or free,
    is in a connection pool (a producer pool only borrows from one). Each
    pool is then marked closed: a publish racing the shutdown fails at once
    instead of opening a connection nobody would close. A parent's
    connections are never here (:func:`forget_inherited`).
    """
    for group in (pools.producers, pools.connections):
        for pool in list(group.values()):
            for resource in _empty(pool):
                if isinstance(resource, Connection):  # not lazy: it was opened
                    resource._close()  # type: ignore[no-untyped-call]  # kombu leaves it untyped


def _empty(pool: Resource) -> list[Any]:
    """Mark ``pool`` closed and take every resource out of it, acquired or free."""
    pool._closed = True
    held: list[Any] = list(pool._dirty)
    pool._dirty.clear()
    while pool._resource.queue:
        held.append(pool._resource.queue.pop())
    return held


def restore_unacked(channel: Any, delivery_tag: str) -> None:
    """Redis: requeue the unacknowledged message of ``delivery_tag`` as a reject would have, once at most."""
    channel.qos.restore_by_tag(delivery_tag, leftmost=True)


def forget_inherited() -> None:
    """In every forked child: the parent's kombu pools are not ours; forget them, unclosed.

    Celery and kombu reset their pools after billiard's forks (pool
    children) but not after gunicorn's ``os.fork``; and kombu's reset
    *collects* each pooled connection, which for AMQP shuts the shared
    socket down (``SHUT_RDWR``): the parent's connection would die with the
    child's start. Marking the inherited pools closed first makes kombu's
    reset skip them; the child then never uses nor closes them.
    """
    for group in (pools.connections, pools.producers):
        for pool in group.values():
            pool._closed = True  # kombu's after-fork force_close_all() returns at once
        group.clear()
    celery_internals.reset_apps_after_fork()


_forks_of: int | None = None  # the process whose direct children forget (None: no hook yet)


def forget_inherited_in_forks() -> None:
    """This process's forks (gunicorn's workers, pool children) forget its pools: :func:`forget_inherited`.

    Only the direct children of the process that called this: a fork
    elsewhere (the app's own multiprocessing) is left alone.
    """
    global _forks_of
    if _forks_of is None:
        os.register_at_fork(after_in_child=_after_fork)
    _forks_of = os.getpid()


def _after_fork() -> None:
    if os.getppid() == _forks_of:
        forget_inherited()


def answers(connection: Connection, timeout: float = 0.5) -> bool:
    """The broker of ``connection`` takes a new connection now (within about ``timeout`` seconds)."""
    probe = connection.clone(connect_timeout=timeout, transport_options={  # type: ignore[no-untyped-call]
        **connection.transport_options,  # type: ignore[dict-item]  # a dict once built
        "socket_connect_timeout": timeout, "socket_timeout": timeout})
    try:
        probe.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        probe.default_channel  # noqa: B018  (Redis: the channel is where it talks to the server)
        return True
    except Exception:  # noqa: BLE001 - any failure: it does not answer
        return False
    finally:
        probe.release()
