"""The several-host bed's reading of worker logs (tests/hosts.py): runs, overlaps, hand-backs."""

from __future__ import annotations

from tests import hostruns

JOB = "d6a314d4bac6474185f9bae14f291dfd"
LINES_A = [
    f"04:21:40.100 worker.child[1] INFO jobs: job {JOB}: attempt 1 started",
    f"04:21:46.600 worker.child[1] WARNING jobs: job {JOB}: attempt 1 stops itself: its lease lapsed after "
    "6.0 s without the database; the sweeper gives the job to another run",
    "04:21:47.000 worker[2] INFO celery.apps.worker: celery@host-a ready.",
]
LINES_B = [f"04:21:49.000 worker.child[3] INFO jobs: job {JOB}: attempt 2 started",
           f"04:22:01.000 worker.child[3] INFO jobs: job {JOB}: attempt 2 succeeded"]


def test_runs_are_read_from_the_workers_lines() -> None:
    (first,) = hostruns.runs_in("a", LINES_A)
    (second,) = hostruns.runs_in("b", LINES_B)
    assert (first.host, first.attempt, first.end) == ("a", 1, "lease lapsed")
    assert (first.started, first.ended) == (4 * 3600 + 21 * 60 + 40.1, 4 * 3600 + 21 * 60 + 46.6)
    assert (second.end, second.ended - second.started) == ("succeeded", 12.0)
    assert hostruns.at_once([first, second]) == []


def test_overlapping_runs_and_a_run_never_ended_are_at_once() -> None:
    first = hostruns.Run(JOB, "a", 1, 10.0, 20.0, "succeeded")
    second = hostruns.Run(JOB, "b", 2, 15.0, 25.0, "succeeded")
    assert hostruns.at_once([first, second]) == [(first, second)]
    open_run = hostruns.Run(JOB, "a", 1, 10.0)
    assert hostruns.at_once([open_run, hostruns.Run(JOB, "b", 2, 30.0, 31.0, "succeeded")]) != []


def test_a_hand_back_is_followed_to_the_next_run() -> None:
    lines = [f"00:00:01.000 worker.child[1] INFO jobs: job {JOB}: attempt 1 started",
             f"00:00:04.000 worker.child[1] WARNING jobs: job {JOB} handed back to the queue "
             "(attempt 1 interrupted by shutdown)"]
    runs = hostruns.runs_in("a", lines) + hostruns.runs_in("b", [
        f"00:00:04.250 worker.child[9] INFO jobs: job {JOB}: attempt 1 started"])
    (back,) = hostruns.handbacks(runs)
    assert (back.from_host, back.to_host) == ("a", "b")
    assert abs(back.waited - 0.25) < 1e-6


def test_every_line_that_ends_a_run_ends_it() -> None:
    """A run whose end the reader missed would read as still running: two runs at once."""
    ends = {
        f"job {JOB}: attempt 1 interrupted by shutdown; the database did not take the hand-back "
        "(OperationalError); recorded in var/handbacks: handed back when its message comes here again "
        "(no new message: OperationalError: refused)": "interrupted",
        f"job {JOB}: attempt 1 interrupted by shutdown; the database did not take the hand-back "
        "(OperationalError); sent again in a new message that carries the hand-back, for the next worker "
        "on any host": "handed back",
        f"job {JOB}: attempt 1 ended but its result is not stored (database unreachable at shutdown); x":
            "interrupted",
        f"job {JOB}: attempt 1 is no longer the job's run (taken over); its result is dropped": "taken over",
        f"job {JOB} failed": "failed",
    }
    for text, end in ends.items():
        started = f"00:00:01.000 worker.child[1] INFO jobs: job {JOB}: attempt 1 started"
        (run,) = hostruns.runs_in("a", [started, f"00:00:02.000 worker.child[1] WARNING jobs: {text}"])
        assert (run.end, run.ended) == (end, 2.0), text
