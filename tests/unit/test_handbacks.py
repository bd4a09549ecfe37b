"""A hand-back the database did not take at a stop (jobs/handbacks.py, tasks/jobs.py), on SQLite.

The run is recorded in a new message for the job, which any worker replays, and in the host's
spool for when the broker refuses that message too; a replay undoes only the run it names.
The real frozen PostgreSQL and a second host: tests/e2e/test_frozen_servers.py.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from celery.exceptions import Reject

from jobs import handbacks, ledger
from jobs.kinds import KINDS, EchoArgs
from stopright import handback
from tasks import jobs
from tests.unit.ledger_helpers import claimed, flaky, new_job

# -- the spool: a recorded hand-back undoes only the run it names ---------------------------------


def test_a_recorded_hand_back_queues_the_job_again(schema) -> None:
    job_id = new_job()
    run = claimed(job_id)
    handbacks.record(job_id, run["attempts"], run["started_at"])
    assert handbacks.replay(job_id) is True
    job = ledger.get(job_id)
    assert (job["status"], job["attempts"]) == ("queued", 0)
    assert handbacks.replay(job_id) is False  # done once, then forgotten
    assert handbacks.spool().path.read_text() == ""


def test_a_recorded_hand_back_never_touches_a_later_run(schema) -> None:
    job_id = new_job()
    first = claimed(job_id)
    handbacks.record(job_id, first["attempts"], first["started_at"])
    assert ledger.hand_back(job_id, first["attempts"])  # handed back after all (the database was back)
    time.sleep(0.002)
    second = claimed(job_id)  # a live run with the same attempt number
    assert second["attempts"] == first["attempts"]
    assert handbacks.replay(job_id) is False
    assert ledger.get(job_id)["status"] == "running"  # the live run is left alone


def test_replay_keeps_other_jobs_records(schema) -> None:
    a, b = new_job(), new_job()
    run_a, run_b = claimed(a), claimed(b)
    handbacks.record(a, run_a["attempts"], run_a["started_at"])
    handbacks.record(b, run_b["attempts"], run_b["started_at"])
    assert handbacks.replay(a) is True
    left = [json.loads(line)["job"] for line in handbacks.spool().path.read_text().splitlines()]
    assert left == [b]


# -- the run's hand-back, when the ledger misses it ----------------------------------------------


def _handed_back_while_the_database_refuses(monkeypatch) -> tuple[str, Reject, dict]:
    """A run interrupted by the worker's SIGUSR2 whose hand-back write fails: its job, the Reject, the run.

    The job's next run is not interrupted: it returns its value.
    """
    runs = []

    def interrupted_once(args: EchoArgs) -> object:
        runs.append(args)
        if len(runs) == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
            raise AssertionError("the job was not interrupted")
        return args.value

    monkeypatch.setitem(KINDS, "echo", (EchoArgs, interrupted_once))
    job_id = ledger.create("echo", {"value": 1})["id"]
    flaky(monkeypatch, "hand_back", failures=1)
    previous = signal.signal(signal.SIGUSR2, handback.interrupt)
    try:
        with pytest.raises(Reject) as rejected:
            jobs.run_job(job_id)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    return job_id, rejected.value, ledger.get(job_id)


def test_a_hand_back_the_database_missed_goes_out_in_a_new_message_any_host_replays(
        schema, monkeypatch, publish, caplog) -> None:
    job_id, rejected, run_row = _handed_back_while_the_database_refuses(monkeypatch)
    assert run_row["status"] == "running"  # the ledger was not told
    assert rejected.requeue is False  # the original message is dropped: the new one is the job's
    [(args, kwargs)] = publish.calls
    assert args[0] == "jobs.run" and kwargs["args"] == [job_id]
    carried = kwargs["kwargs"]["handed_back"]
    assert carried == {"attempt": 1, "started_at": run_row["started_at"].isoformat()}
    assert handbacks.spool().path.read_text() == ""  # the message carries it: no record left here
    assert "sent again in a new message" in caplog.text

    jobs.run_job(job_id, handed_back=carried)  # the next worker, with an empty spool: another host
    done = ledger.get(job_id)
    assert (done["status"], done["attempts"], done["result"]) == ("succeeded", 1, 1)


def test_a_carried_hand_back_of_another_run_changes_nothing(schema, monkeypatch, publish) -> None:
    job_id, _, run_row = _handed_back_while_the_database_refuses(monkeypatch)
    handed = publish.calls[0][1]["kwargs"]["handed_back"]
    assert ledger.hand_back(job_id, 1)  # the ledger took it after all, and the job ran again ...
    again = ledger.claim(job_id, lease=30, max_attempts=3)
    assert again is not None and again["attempts"] == 1
    jobs.run_job(job_id, handed_back=handed)  # ... so the old run's record must not undo the new run
    row = ledger.get(job_id)
    assert (row["status"], row["attempts"], row["started_at"]) == ("running", 1, again["started_at"])


def test_a_hand_back_the_database_missed_is_requeued_and_kept_here_when_the_broker_refuses_too(
        schema, monkeypatch, publish, caplog) -> None:
    publish.raises = ConnectionRefusedError(111, "Connection refused")
    job_id, rejected, run_row = _handed_back_while_the_database_refuses(monkeypatch)
    assert rejected.requeue is True
    assert "no new message: ConnectionRefusedError" in caplog.text
    publish.raises = None
    jobs.run_job(job_id)  # its message, requeued, comes back to this host: the spool replays it
    done = ledger.get(job_id)
    assert (done["status"], done["attempts"], done["result"]) == ("succeeded", 1, 1)
    assert handbacks.spool().path.read_text() == ""
