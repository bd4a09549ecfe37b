"""DATABASE_URL selects PostgreSQL; the server sees every connection closed properly."""

from __future__ import annotations

import re
import time

from tests.e2e.checks import assert_clean_stop
from tests.procset import ProcessSet
from tests.servers import PostgresServer


def test_set_on_postgres_closes_every_connection(procset: ProcessSet, postgres: PostgresServer) -> None:
    ps = procset.make(DATABASE_URL=postgres.url)
    ps.start()
    ps.wait_ready()
    short = ps.submit("echo", value=[1, 2, 3])
    assert ps.job(short, wait=20)["result"] == [1, 2, 3]
    long = ps.submit("sleep", seconds=8)
    ps.wait_status(long, "running")
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130)

    # Each backend logs its client's end as it notices it: give the last ones a moment.
    deadline = time.monotonic() + 10
    while True:
        log = postgres.log_text()
        opened = len(re.findall(r"connection authorized: user=postgres", log))
        closed = len(re.findall(r"disconnection: session time:", log))
        if closed >= opened or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert opened >= 4, log  # web workers, worker main and children, beat's sweep...
    assert "unexpected EOF on client connection" not in log, log
    assert "could not receive data from client" not in log, log
    assert closed == opened, f"{opened} opened, {closed} closed:\n{log}"

    again = procset.make(DATABASE_URL=postgres.url)
    again.start()
    again.wait_ready()
    job = again.job(long, wait=30)
    if job["status"] != "succeeded":
        job = again.job(long, wait=30)
    assert job["status"] == "succeeded", job
    rc, _ = again.stop_and_wait("sigterm")
    assert_clean_stop(again, rc, 143)
