"""This process's broker connections: readiness, the wait at start, the close at exit.

The broker is Redis or RabbitMQ (``BROKER_URL``, core/config.py). A process
holds up to three kinds of connection to it:

* Celery/kombu's own: closed by stopright in every process, with their
  protocol's handshake (stopright/upstream/kombu.py).
* The probe behind ``/readyz`` (:func:`ping`): one redis-py client, or one
  AMQP connection, opened on first use and closed at shutdown.
* The wait at start (:func:`wait_until_up`): opened and closed at once.

Across a fork nothing is inherited: a child forgets its parent's probe
without closing it (an AMQP close from the child would end the
parent's connection, whose socket it shares), and opens its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from core.config import get_settings
from stopright import registry

log = logging.getLogger("broker")

#: How long a readiness ping may take (connect, or one round trip).
PING_SECONDS = 1.0

_client: redis.Redis | None = None
_client_pid: int | None = None


# -- Redis: the redis-py client for readiness ---------------------------------
def client() -> redis.Redis:
    """This process's redis-py client on the Redis broker (not for RabbitMQ)."""
    global _client, _client_pid
    current = _client
    if current is None or _client_pid != os.getpid():
        # A client inherited across fork is dropped, not closed: redis-py's
        # pool notices the pid change and never reuses the parent's sockets.
        current = _client = redis.Redis.from_url(_redis_url(), socket_timeout=PING_SECONDS,
                                                 socket_connect_timeout=PING_SECONDS)
        _client_pid = os.getpid()
        registry.current().register("redis client", close, forks=False)  # closed at once if late
    return current


def close() -> None:
    global _client
    if _client is not None and _client_pid == os.getpid():
        _client.close()
        _client = None


def _redis_url() -> str:
    url = get_settings().redis_client_url
    if url is None:
        raise RuntimeError("the broker is RabbitMQ (BROKER_URL): there is no Redis to talk to")
    return url


# -- RabbitMQ: one AMQP connection for readiness -------------------------------
class _AmqpProbe:
    """One AMQP connection of this process, used by ``/readyz`` threads in turn.

    Each ping is one round trip (``basic.qos``, which changes nothing on a
    channel that consumes nothing). A connection found broken (the broker
    restarted) is dropped and replaced at once, so a broker that is back is
    seen on the first ping; a silent one costs one timeout, then False.
    Heartbeats are off (``heartbeat=0``): RabbitMQ never closes the idle probe.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._channel: Any = None  # amqp.Channel

    def _connect(self) -> None:
        conn = _open_amqp(self.url, connect_timeout=PING_SECONDS,
                          transport_options={"read_timeout": PING_SECONDS, "write_timeout": PING_SECONDS})
        try:
            # py-amqp's own channel: kombu's default_channel would reconnect forever.
            self._channel = conn.connection.channel()
        except BaseException:
            conn.collect()
            raise
        self._conn = conn

    def ping(self) -> bool:
        if not self._lock.acquire(timeout=PING_SECONDS):
            return False  # another thread's ping is stuck: not ready either way
        try:
            for reused in (self._conn is not None, False):
                try:
                    if self._conn is None:
                        self._connect()
                    self._channel.basic_qos(0, 0, False)
                    return True
                except Exception as exc:  # noqa: BLE001 - any failure: not ready
                    self._drop()
                    if not reused or isinstance(exc, TimeoutError):  # a silent broker: no second second
                        return False
            return False
        finally:
            self._lock.release()

    def _drop(self) -> None:
        """A broken connection: close its socket; no handshake to wait for."""
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.collect()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        """At shutdown: AMQP close (close / close-ok), bounded by the read timeout."""
        with self._lock:
            conn, self._conn, self._channel = self._conn, None, None
            if conn is not None:
                conn.release()


_probe: _AmqpProbe | None = None
_probe_lock = threading.Lock()


def _amqp_probe() -> _AmqpProbe:
    global _probe
    with _probe_lock:
        if _probe is None or _probe.pid != os.getpid():  # a parent's probe: forgotten, unclosed
            _probe = _AmqpProbe(get_settings().broker_url)
            registry.current().register("amqp probe", _probe.close, forks=False)
        return _probe


# -- what the rest of the project calls ---------------------------------------
def ping() -> bool:
    """Does the broker in use answer? Within about :data:`PING_SECONDS`."""
    if get_settings().broker_is_amqp:
        return _amqp_probe().ping()
    try:
        return bool(client().ping())
    except redis.RedisError:
        return False


def wait_until_up(timeout: float = 15.0) -> bool:
    """Block until the broker answers (it starts beside us under honcho)."""
    settings = get_settings()
    deadline = time.monotonic() + timeout
    attempt = _amqp_connects if settings.broker_is_amqp else _redis_answers
    while True:
        try:
            attempt(settings.broker_url)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() >= deadline:
                log.error("broker at %s did not answer within %.0f s",
                          maybe_sanitize_url(settings.broker_url), timeout)
                return False
            time.sleep(0.05)


def _redis_answers(_url: str) -> None:
    probe = redis.Redis.from_url(_redis_url(), socket_timeout=1, socket_connect_timeout=1)
    try:
        probe.ping()
    finally:
        probe.close()


def _amqp_connects(url: str) -> None:
    _open_amqp(url, connect_timeout=1).release()  # with the close handshake


def _open_amqp(url: str, **options: Any) -> Connection:
    """An AMQP connection, connected once or not at all (kombu's connect() sleeps 2 s before a retry).

    Heartbeats are off: these connections are short-lived or idle by design.
    """
    conn = Connection(url, heartbeat=0, **options)
    try:
        conn.ensure_connection(max_retries=0)
    except BaseException:
        conn.collect()
        raise
    return conn
