from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procset import ProcessSet
from tests.rabbitmq_node import RabbitMQServer, Vhost, find_rabbitmq
from tests.servers import PostgresServer, RedisServer, find_pg_bin, missing


@pytest.fixture
def procset(tmp_path: Path) -> Iterator[ProcessSet]:
    """A fresh process set (not started) whose processes are always killed at the end."""
    started: list[ProcessSet] = []

    def make(**env: str) -> ProcessSet:
        ps = ProcessSet(tmp_path, env=env)
        started.append(ps)
        return ps

    ps = make()
    ps.make = make  # type: ignore[attr-defined]  # another set on the same var/
    yield ps
    for each in started:
        each.cleanup()


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server (tests/servers.py), removed at the end."""
    bindir = find_pg_bin()
    if bindir is None:
        missing("no PostgreSQL server is installed (initdb not found)", "REQUIRE_POSTGRES")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop(fast=True)
        server.remove()


@pytest.fixture
def external_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own (REDIS_URL), on a free port, removed at the end."""
    server = RedisServer(tmp_path / "external-redis")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(external_redis: RedisServer) -> str:
    return external_redis.url


@pytest.fixture(scope="session")
def rabbitmq_node() -> Iterator[RabbitMQServer]:
    bindir = find_rabbitmq()
    if bindir is None:
        missing("no RabbitMQ server is installed (rabbitmq-server not found)", "REQUIRE_RABBITMQ")
    node = RabbitMQServer(bindir)
    try:
        node.start()
        yield node
    finally:
        node.remove()


@pytest.fixture
def rabbitmq(rabbitmq_node: RabbitMQServer) -> Vhost:
    """A fresh vhost on the session's node (started again if a test left it stopped)."""
    if rabbitmq_node.proc is None or rabbitmq_node.proc.poll() is not None:
        rabbitmq_node.stop()
        rabbitmq_node.start()
    name = f"test-{uuid.uuid4().hex[:8]}"
    return Vhost(rabbitmq_node, name, rabbitmq_node.add_vhost(name))
