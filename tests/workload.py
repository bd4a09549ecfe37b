"""A busy set to stop, for any process manager: long jobs, a long poll, a request stream.

Interface (stable; tests/e2e/test_deploy_*.py and other managers' tests use it)::

    client = AppClient(port, var_dir)          # tests/procset.py; a ProcessSet is one too
    load = Workload(client, jobs=6, job_seconds=12)
    load.start()          # N `sleep` jobs running (seen in the API), a long poll sent,
                          # the request stream started (POST echo job + GET it, in a loop)
    ...                   # stop the set with the manager's own command; wait for it
    outcomes = load.finish()      # stops the stream; Outcomes of every request
    outcomes.assert_clean()       # no 5xx, no reset, no truncated answer; long poll answered
    ...                   # start the set again (same VAR_DIR); wait_ready(client2)
    verdict = load.verdict(client2, timeout=60)   # every job accepted before or during the stop
    verdict.assert_none_lost()                    # succeeded; none failed, none late

``start()`` returns once every long job is ``running``, the stream has had
3 answers per thread and the long poll's request is written to its socket (the server may still have it in its
accept queue: that is the race a stop must handle). The stream runs in a few
threads, each request on a new connection, until ``finish()`` (or
``max_seconds``); after a refused connection a thread waits 50 ms before the
next try, so a stopped server is not hammered. Each request ends as one of:
an HTTP status; ``refused`` (nothing listening: expected once the web
process has closed its listener); ``reset`` (accepted, then closed or reset
without an answer); ``truncated`` (an answer cut short: short body or JSON
that does not parse); ``timeout``. ``refused`` is the only failure allowed
across a stop. The jobs checked after the restart are the long jobs and
every echo job answered 202; a job not ``succeeded`` within ``timeout`` is
``late`` (``failed`` if the ledger says so).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.procset import AppClient

STREAM_THREADS = 4


@dataclass
class Outcomes:
    """How every request made during the run ended."""

    counts: Counter[str] = field(default_factory=Counter)  # "200", "202", "refused", "reset" ...
    long_poll: str = "not sent"  # outcome of the long poll sent before the stop
    long_poll_body: Any = None
    samples: list[str] = field(default_factory=list)  # a few bad outcomes, for the message

    @property
    def server_errors(self) -> int:
        return sum(n for k, n in self.counts.items() if k.isdigit() and int(k) >= 500)

    @property
    def dropped(self) -> int:
        """Requests reset, cut short or left unanswered (not refused)."""
        return self.counts["reset"] + self.counts["truncated"] + self.counts["timeout"]

    def assert_clean(self) -> None:
        summary = f"{dict(self.counts)}; long poll {self.long_poll}; e.g. {self.samples[:5]}"
        assert self.server_errors == 0, summary
        assert self.dropped == 0, summary
        assert self.long_poll == "200", summary
        assert isinstance(self.long_poll_body, dict) and "status" in self.long_poll_body, summary
        assert self.counts["202"] > 0, summary  # the stream did run


@dataclass
class Verdict:
    accepted: int
    succeeded: list[str]
    failed: list[str]
    late: list[str]
    jobs: dict[str, dict[str, Any]]

    def assert_none_lost(self) -> None:
        bad = {j: self.jobs.get(j) for j in self.failed + self.late}
        assert not self.failed and not self.late, (
            f"{len(self.failed)} failed, {len(self.late)} late of {self.accepted}: {bad}")


def _request(port: int, method: str, path: str, body: Any = None,
             timeout: float = 40) -> tuple[str, Any]:
    """One request on a new connection: (outcome, parsed body or None)."""
    data = None if body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            return "refused", None
        try:
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            response = conn.getresponse()
            raw = response.read()
        except http.client.IncompleteRead:
            return "truncated", None
        except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
            return "reset", None
        except TimeoutError:
            return "timeout", None
        try:
            parsed = json.loads(raw)
        except ValueError:
            return "truncated", raw[:200]
        return str(response.status), parsed
    except OSError as e:  # anything else on the socket: count it, never hide it
        return f"oserror:{e.__class__.__name__}", None
    finally:
        conn.close()


class Workload:
    def __init__(self, client: AppClient, *, jobs: int = 6, job_seconds: float = 12,
                 threads: int = STREAM_THREADS, max_seconds: float = 180,
                 reports_running: bool = True) -> None:
        self.client = client
        self.jobs = jobs
        self.job_seconds = job_seconds
        self.threads = threads
        self.max_seconds = max_seconds
        # False for a set whose API never says "running" (the stock reference): start() then
        # gives the worker 2 s to pick the jobs up. For measurements only, never as a proof.
        self.reports_running = reports_running
        self.long_ids: list[str] = []
        self.echo_ids: list[str] = []
        self.outcomes = Outcomes()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    # -- before the stop -----------------------------------------------------
    def start(self, running_timeout: float = 60) -> None:
        self.long_ids = [self.client.submit("sleep", seconds=self.job_seconds) for _ in range(self.jobs)]
        for job_id in self.long_ids:
            if self.reports_running:
                self.client.wait_status(job_id, "running", timeout=running_timeout)
        if not self.reports_running:
            time.sleep(2)
        sent = threading.Event()
        poller = threading.Thread(target=self._long_poll, args=(self.long_ids[0], sent), daemon=True)
        poller.start()
        self._workers.append(poller)
        assert sent.wait(10), "the long poll could not be sent"
        for _ in range(self.threads):
            t = threading.Thread(target=self._stream, daemon=True)
            t.start()
            self._workers.append(t)
        # The stream is in full flow (a few answers per thread) when start() returns.
        deadline = time.monotonic() + 20
        while self.outcomes.counts["202"] < 3 * self.threads and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.outcomes.counts["202"] >= 3 * self.threads, dict(self.outcomes.counts)

    def _long_poll(self, job_id: str, sent: threading.Event) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.client.port, timeout=60)
        outcome, body = "refused", None
        try:
            conn.connect()
            conn.request("GET", f"/jobs/{job_id}?wait=30")
            sent.set()
            response = conn.getresponse()
            raw = response.read()
            body = json.loads(raw)
            outcome = str(response.status)
        except ConnectionRefusedError:
            outcome = "refused"
        except http.client.IncompleteRead:
            outcome = "truncated"
        except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
            outcome = "reset"
        except TimeoutError:
            outcome = "timeout"
        except ValueError:
            outcome = "truncated"
        finally:
            sent.set()
            conn.close()
        with self._lock:
            self.outcomes.long_poll, self.outcomes.long_poll_body = outcome, body

    def _record(self, what: str, outcome: str) -> None:
        with self._lock:
            self.outcomes.counts[outcome] += 1
            if not outcome.isdigit() or int(outcome) >= 500:
                if outcome != "refused" and len(self.outcomes.samples) < 20:
                    self.outcomes.samples.append(f"{what}: {outcome}")

    def _stream(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            n += 1
            outcome, body = _request(self.client.port, "POST", "/jobs",
                                     {"task": "echo", "args": {"value": n}})
            self._record("POST /jobs", outcome)
            if outcome == "202" and isinstance(body, dict):
                with self._lock:
                    self.echo_ids.append(body["id"])
                outcome, _ = _request(self.client.port, "GET", f"/jobs/{body['id']}?wait=2")
                self._record("GET /jobs/<id>?wait=2", outcome)
            if outcome == "refused":
                self._stop.wait(0.05)

    # -- after the stop ------------------------------------------------------
    def finish(self) -> Outcomes:
        """Stop the stream (call once the set has stopped) and return what every request got."""
        self._stop.set()
        for t in self._workers:
            t.join(60)
        assert not any(t.is_alive() for t in self._workers), "a request never ended"
        return self.outcomes

    def verdict(self, client: AppClient | None = None, timeout: float = 60) -> Verdict:
        """After the restart: poll every accepted job until it succeeded, failed or ``timeout``."""
        client = client or self.client
        pending = set(self.long_ids + self.echo_ids)
        jobs: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                r = client.http("GET", f"/jobs/{job_id}?wait=0", timeout=10)
                if r.status == 200:
                    jobs[job_id] = r.body
                    if r.body["status"] in ("succeeded", "failed"):
                        pending.discard(job_id)
            if pending:
                time.sleep(0.2)
        done = [j for j, v in jobs.items() if v["status"] == "succeeded"]
        failed = [j for j, v in jobs.items() if v["status"] == "failed"]
        return Verdict(accepted=len(self.long_ids) + len(self.echo_ids), succeeded=done,
                       failed=failed, late=sorted(pending), jobs=jobs)


def wait_ready(client: AppClient, timeout: float = 60, path: str = "/readyz") -> None:
    """Block until GET /readyz answers 200 (web up, database and broker answering)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = client.http("GET", path, timeout=5)
        if last.status == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"/readyz not 200 within {timeout} s: {last}")


def assert_handed_back_then_run(load: Workload, stopped: AppClient, restart: Any) -> None:
    """Each long job was handed back (``queued``, no attempt used up); a restarted set runs all.

    ``restart``: a started-later set on the same data (e.g. ``ProcessSet(tmp_path)``), which
    the caller also registers for cleanup; it is started here.
    """
    jobs = stopped.stored_jobs()
    for job_id in load.long_ids:
        assert (jobs[job_id]["status"], jobs[job_id]["attempts"]) == ("queued", 0), jobs[job_id]
    restart.start()
    restart.wait_ready()
    load.verdict(restart, timeout=60).assert_none_lost()
