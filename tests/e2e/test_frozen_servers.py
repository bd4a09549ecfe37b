"""Frozen servers, not only gone ones (issue 14): PostgreSQL up but not answering, a broker down at a stop.

A frozen PostgreSQL (every process SIGSTOPped: a stuck disk, a paused VM, a
network black hole) still completes TCP handshakes and acknowledges data, so
no TCP-level timeout ever fires; only a deadline in the client ends a wait
(core/db.py). What counts, each checked while the server stays frozen:

* every request, readiness check and stop ends (503, never a hang): the
  server is thawed only once every client thread has its answer, so a request
  that waited on it would show as a client timeout, not as a slow answer;
* no connection is left half-open: at a clean stop after the thaw, PostgreSQL
  logs no reset and no unexpected EOF;
* a stop during the freeze is clean (no SIGKILL) with requests waiting on the
  server, each answered 503 or refused once the listener is closed, and hands
  the running jobs back; after a restart they run again (attempt 1: handed
  back, not taken back by the sweeper, whose lease here outlasts the test),
  also on another host, with a ``VAR_DIR`` of its own: the job's new message
  carries the hand-back the database missed (jobs/handbacks.py).

And a Redis broker that is down at the stop: the hand-back's requeue fails,
and the message runs once the broker is back (stopright/requeue.py), not after
kombu's visibility timeout or the ledger's queued lease.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.checks import assert_clean_stop, ran_again
from tests.procset import ProcessSet
from tests.servers import PostgresServer, RedisServer
from tests.workload import _request as request_once

#: How long the clients keep asking while PostgreSQL is frozen.
FROZEN_LOAD_SECONDS = 6.0
CLIENTS = 8
#: A client gives up on an answer after this long: a request that waits on the frozen server.
CLIENT_TIMEOUT = 20.0
#: Longer than the test: only a hand-back can make a job runnable again, never the sweeper.
NO_SWEEP = {"JOB_LEASE_SECONDS": "600", "JOB_QUEUED_LEASE_SECONDS": "600"}


@dataclass
class Answer:
    what: str
    outcome: str  # the HTTP status, or "refused", "reset", "timeout" (tests/workload.py)
    seconds: float
    body: Any


class Clients:
    """``CLIENTS`` threads posting a job, long-polling one and asking /readyz, in a loop, until stopped.

    Each request on a new connection, given ``CLIENT_TIMEOUT`` to be answered: a request that waits
    on a frozen server ends as "timeout". A refused connection (the set stopped) pauses the thread.
    """

    def __init__(self, ps: ProcessSet, job_id: str) -> None:
        self.port = ps.port
        self.job_id = job_id
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def start(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def wait_for(self, count: int) -> None:
        """Until ``count`` answers came back (the load is in flow)."""
        deadline = time.monotonic() + 3 * CLIENT_TIMEOUT
        while len(self.answers) < count:
            assert time.monotonic() < deadline, self.summary()
            time.sleep(0.05)

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(3 * CLIENT_TIMEOUT + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread never ended"
        return self.answers

    def _client(self) -> None:
        while not self._stop.is_set():
            for what, method, path, body in (
                    ("POST /jobs", "POST", "/jobs", {"task": "echo", "args": {"value": 1}}),
                    ("long poll", "GET", f"/jobs/{self.job_id}?wait=5", None),
                    ("GET /readyz", "GET", "/readyz", None)):
                started = time.monotonic()
                outcome, parsed = request_once(self.port, method, path, body, timeout=CLIENT_TIMEOUT)
                with self._lock:
                    self.answers.append(Answer(what, outcome, time.monotonic() - started, parsed))
                if outcome == "refused":
                    self._stop.wait(0.05)

    def summary(self) -> str:
        """Requests by kind and outcome, with the longest wait of each kind."""
        by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        longest: dict[str, float] = collections.defaultdict(float)
        for answer in self.answers:
            by_kind[answer.what][answer.outcome] += 1
            longest[answer.what] = max(longest[answer.what], answer.seconds)
        return "; ".join(f"{what}: {dict(counts)} (longest {longest[what]:.1f} s)"
                         for what, counts in by_kind.items())


def _unclean_ends(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if "could not receive data from client" in line or "unexpected EOF" in line
            or "could not send data to client" in line]


def test_a_frozen_postgres_answers_503_and_leaves_no_connection_half_open(
        procset: ProcessSet, postgres: PostgresServer) -> None:
    ps = procset.make(DATABASE_URL=postgres.url)
    ps.start()
    ps.wait_ready()
    waiting = ps.submit("sleep", seconds=0)
    assert ps.job(waiting, wait=20)["status"] == "succeeded"

    postgres.freeze()
    try:
        clients = Clients(ps, waiting).start()
        time.sleep(FROZEN_LOAD_SECONDS)  # the load's length, not a proof
        answers = clients.stop()  # every request has its answer before the server thaws
    finally:
        postgres.thaw()
    thawed = time.monotonic()
    print(f"\nPostgreSQL frozen {FROZEN_LOAD_SECONDS:.0f} s under {CLIENTS} clients: {clients.summary()}")

    # Every request was answered while the server stayed frozen, none with a 5xx other than 503.
    assert answers and {a.outcome for a in answers} == {"503"}, clients.summary()
    for answer in answers:
        if answer.what == "GET /readyz":
            assert any(r.startswith("database") for r in answer.body["reasons"]), answer
        else:
            error = answer.body["error"]
            assert error["status"] == 503 and "database" in error["message"], answer

    ps.wait_ready()
    print(f"ready {time.monotonic() - thawed:.1f} s after the thaw")
    after = ps.submit("echo", value="after the thaw")
    assert ps.job(after, wait=20)["result"] == "after the thaw"
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130)

    # No connection left half-open: each session ended properly (a Terminate), and no connection
    # attempt abandoned during the freeze lingered until its process exited (a reset).
    log = postgres.log_text()
    assert not _unclean_ends(log), "\n".join(_unclean_ends(log))


def start_running_two_jobs(ps: ProcessSet) -> tuple[list[str], list[str]]:
    """Start the set and two 10 s jobs; their ids and when each run started (to see them run again)."""
    ps.start()
    ps.wait_ready()
    jobs = [ps.submit("sleep", seconds=10) for _ in range(2)]
    return jobs, [ps.wait_status(job_id, "running")["started_at"] for job_id in jobs]


def test_a_stop_while_postgres_is_frozen_is_clean_and_hands_the_jobs_back(
        procset: ProcessSet, postgres: PostgresServer) -> None:
    ps = procset.make(DATABASE_URL=postgres.url, **NO_SWEEP)
    jobs, first_starts = start_running_two_jobs(ps)

    postgres.freeze()
    try:
        clients = Clients(ps, jobs[0]).start()
        clients.wait_for(CLIENTS)  # requests are waiting on the frozen server when the stop comes
        rc, stop_seconds = ps.stop_and_wait("ctrl_c", timeout=30)
        answers = clients.stop()
        out = ps.output
        killed = out.count("sending SIGKILL") + len(re.findall(r"did not hand back .*: SIGKILL", out))
        print(f"\nCtrl+C during a PostgreSQL freeze: stopped in {stop_seconds:.1f} s, {killed} SIGKILL(s); "
              f"requests: {clients.summary()}")
        assert_clean_stop(ps, rc, 130)  # no SIGKILL from honcho, every process's own stop complete
        assert {a.outcome for a in answers} <= {"503", "refused"}, clients.summary()  # none hung or reset
        assert "did not hand back" not in out, out
        assert "stop phase overran" not in out and "timed out" not in out, out  # no phase, no close hung
    finally:
        postgres.thaw()
    thawed = time.monotonic()
    # What the server logs at the thaw for the connections that were waiting on it when their
    # process had to exit (the stop cannot wait for a frozen server).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "database system is ready" not in postgres.log_text():
        time.sleep(0.1)
    time.sleep(1)  # settle: the server reads what the clients left in its sockets
    unclean = _unclean_ends(postgres.log_text())
    print(f"PostgreSQL logged at the thaw: {len(unclean)} unclean end(s)", *unclean, sep="\n  ")

    again = procset.make(DATABASE_URL=postgres.url, **NO_SWEEP)
    again.start()
    again.wait_ready()
    ready = time.monotonic()
    for job_id, first_start in zip(jobs, first_starts, strict=True):
        job = ran_again(again, job_id, first_start)
        assert job["attempts"] == 1, job  # handed back (attempt not counted), then claimed once
    print(f"the {len(jobs)} handed-back jobs ran again {time.monotonic() - ready:.1f} s after the restart "
          f"was ready ({ready - thawed:.1f} s after the thaw); 0 lost")
    rc, _ = again.stop_and_wait("ctrl_c")
    assert rc == 130


def test_a_hand_back_the_frozen_database_missed_runs_at_once_on_another_host(
        procset: ProcessSet, postgres: PostgresServer, external_redis: RedisServer, tmp_path: Path) -> None:
    env = {"DATABASE_URL": postgres.url, "REDIS_URL": external_redis.url, **NO_SWEEP}
    ps = procset.make(**env)
    jobs, first_starts = start_running_two_jobs(ps)

    postgres.freeze()
    try:
        rc, _ = ps.stop_and_wait("ctrl_c", timeout=30)
        assert_clean_stop(ps, rc, 130, nothing_to_close=("broker",))  # Redis is not the set's own
        sent = [line for line in ps.lines("worker") if "did not take the hand-back" in line]
        print(*sent, sep="\n")
        assert len(sent) == len(jobs), ps.output
        assert all("sent again in a new message" in line for line in sent), sent
    finally:
        postgres.thaw()

    # Host b: the same database and broker, its own VAR_DIR (no spool of host a's).
    (tmp_path / "host-b").mkdir()
    other = ProcessSet(tmp_path / "host-b", env=env)
    try:
        other.start()
        other.wait_ready()
        ready = time.monotonic()
        for job_id, first_start in zip(jobs, first_starts, strict=True):
            job = ran_again(other, job_id, first_start)
            assert job["attempts"] == 1, job  # handed back (its message said so), then claimed once
        print(f"the {len(jobs)} handed-back jobs ran again on another host {time.monotonic() - ready:.1f} s "
              "after it was ready (the sweeper's lease here outlasts the test)")
        rc, _ = other.stop_and_wait("ctrl_c")
        assert rc == 130
    finally:
        other.cleanup()


def test_a_stop_while_redis_is_down_requeues_once_it_is_back(procset: ProcessSet,
                                                             external_redis: RedisServer) -> None:
    ps = procset.make(REDIS_URL=external_redis.url, **NO_SWEEP)
    jobs, first_starts = start_running_two_jobs(ps)

    external_redis.stop()
    ps.wait_for_line(r"(?i)connection to broker lost|Cannot connect to redis", timeout=30, name="worker")
    clients = Clients(ps, jobs[0]).start()
    clients.wait_for(CLIENTS)
    rc, stop_seconds = ps.stop_and_wait("ctrl_c", timeout=30)
    answers = clients.stop()
    out = ps.output
    print(f"\nCtrl+C with Redis down: stopped in {stop_seconds:.1f} s, "
          f"{out.count('sending SIGKILL')} SIGKILL(s); requests: {clients.summary()}")
    assert_clean_stop(ps, rc, 130, nothing_to_close=("broker",))
    assert {a.outcome for a in answers} <= {"200", "202", "503", "refused"}, clients.summary()
    assert "Couldn't reject" not in out and "CRITICAL" not in out, out
    stored = ps.stored_jobs()
    assert [stored[j]["status"] for j in jobs] == ["queued", "queued"], stored  # handed back in the ledger
    refused = [line for line in ps.lines("worker") if "requeue refused" in line]
    assert len(refused) == len(jobs), out  # one line each, saying what happens next
    print(*refused, sep="\n")

    # The set starts again while Redis is still down; the jobs run once it is back.
    again = procset.make(REDIS_URL=external_redis.url, **NO_SWEEP)
    again.start()
    deadline = time.monotonic() + 60
    while again.http("GET", "/healthz").status != 200:  # up; the worker waits for its broker
        assert time.monotonic() < deadline, again.output
        time.sleep(0.1)
    external_redis.start()
    back = time.monotonic()
    for job_id, first_start in zip(jobs, first_starts, strict=True):
        job = ran_again(again, job_id, first_start)
        assert job["attempts"] == 1, job
    print(f"the {len(jobs)} handed-back jobs ran again {time.monotonic() - back:.1f} s after Redis was back; "
          f"0 lost", *(line for line in again.lines("worker") if "requeued task" in line), sep="\n")
    rc, _ = again.stop_and_wait("ctrl_c")
    assert rc == 130
