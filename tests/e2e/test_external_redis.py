"""With REDIS_URL set, plain ``honcho start`` uses that Redis (the broker entry idles)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.checks import assert_clean_stop
from tests.procset import ProcessSet
from tests.servers import RedisServer


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "external-redis", db=3)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


def test_set_uses_an_external_redis(procset: ProcessSet, redis_url: str) -> None:
    ps = procset.make(REDIS_URL=redis_url)
    ps.start()
    ps.wait_ready()
    assert "REDIS_URL is set: using that Redis" in ps.output
    assert not (ps.var / "redis.sock").exists()
    job_id = ps.submit("echo", value="via tcp")
    assert ps.job(job_id, wait=20)["result"] == "via tcp"
    long = ps.submit("sleep", seconds=30)
    ps.wait_status(long, "running")
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130, nothing_to_close=("broker",))  # it opened nothing
    # The handed-back message waits in the external Redis (db 3) for the next worker.
    with redis.Redis.from_url(redis_url) as client:
        assert client.llen("jobs") == 1
        # And no client of the set is left: each process closed its connections, then exited.
        deadline = time.monotonic() + 5
        while True:
            others = [c for c in client.client_list() if c["id"] != str(client.client_id())]
            if not others or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not others, others
