"""The embedded Redis sees every client of the set leave before it stops (issue 7, point 7).

The broker entry stops redis-server only once ``CLIENT LIST`` shows no
client (broker/launcher.py ``linger``), or after grace + 1.5 s with a
warning naming how many were still connected. (With ``REDIS_URL``, the
server outlives the set and tests/e2e/test_external_redis.py reads its
``CLIENT LIST`` after the stop.)
"""

from __future__ import annotations

import concurrent.futures

from tests.e2e.checks import assert_clean_stop
from tests.e2e.test_direct_ctrl_c import queue_job
from tests.procset import ProcessSet


def test_every_client_leaves_the_embedded_redis_before_it_stops(procset: ProcessSet) -> None:
    ps = procset.make(SWEEP_INTERVAL_SECONDS="1", JOB_QUEUED_LEASE_SECONDS="1")
    stranded = queue_job(ps.env, "echo", {"value": "swept"}, publish=False)  # a pool child publishes it
    ps.start()
    ps.wait_ready()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # web workers publish from several threads
        ids = list(pool.map(lambda i: ps.submit("echo", value=i), range(50)))
        jobs = list(pool.map(lambda job_id: ps.job(job_id, wait=30), ids))
    assert [j["status"] for j in jobs] == ["succeeded"] * 50, jobs
    assert ps.job(stranded, wait=30)["result"] == "swept"
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130)
    broker = "\n".join(ps.lines("broker"))
    assert "still connected" not in broker, broker
    assert "closed redis-server" in broker, broker
