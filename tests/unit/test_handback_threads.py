"""The threads pool's hand-back: raised in the task's thread, only where the task may be cut (issue 14).

Under ``-P threads`` the worker's stop raises :class:`stopright.HandBack` in the
thread of each running task (``PyThreadState_SetAsyncExc``), at its next
bytecode. A task with ``interrupt_anywhere = False`` marks where it may be cut
(:func:`stopright.interruptible`): a hand-back that comes outside those
sections waits for the next one, and one delivered inside lands there, never
after the run has left it (the caller, Celery's tracer, would get a bare
HandBack instead of the task's Reject).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest

from stopright import handback
from stopright.handback import HandBack, interruptible


@pytest.fixture
def threads_delivery() -> Iterator[None]:
    handback.configure("thread")
    yield
    handback.configure("signal")


def test_a_hand_back_lands_inside_the_task_never_after_it(threads_delivery: None) -> None:
    outcomes = {"inside": 0, "escaped": 0, "finished": 0}
    current: list[str | None] = [None]
    done = threading.Event()

    def runs() -> None:
        for n in range(20_000):
            current[0] = f"task-{n}"
            try:
                with handback._run.handling(current[0]):
                    try:
                        with interruptible():
                            sum(range(200))  # cut anywhere in here
                        sum(range(50))  # not interruptible: a hand-back waits for the next section
                        outcomes["finished"] += 1
                    except HandBack:
                        outcomes["inside"] += 1
            except HandBack:
                outcomes["escaped"] += 1
        done.set()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows: every race, often
    runner = threading.Thread(target=runs)
    runner.start()
    delivered = 0
    try:
        while not done.is_set():
            if current[0] is not None and handback.interrupt_run(current[0]):
                delivered += 1
    finally:
        sys.setswitchinterval(switch)
    runner.join(30)
    assert outcomes["escaped"] == 0, outcomes
    assert outcomes["inside"] > 0 and delivered > 0, (outcomes, delivered)


def test_outside_any_section_the_hand_back_waits_for_the_next_one(threads_delivery: None) -> None:
    seen: list[str] = []
    outside, go_on = threading.Event(), threading.Event()

    def run() -> None:
        with handback._run.handling("one"):
            outside.set()
            go_on.wait(10)  # not in a section: nothing is raised here
            seen.append("outside, not cut")
            try:
                with interruptible():
                    seen.append("not reached")
            except HandBack:
                seen.append("cut on entering the next section")

    thread = threading.Thread(target=run)
    thread.start()
    assert outside.wait(10)
    assert handback.interrupt_run("one")
    go_on.set()
    thread.join(10)
    assert seen == ["outside, not cut", "cut on entering the next section"]
    assert handback.interrupt_run("one") is False  # over: nothing to hand back


def test_a_run_blocked_in_a_c_call_gets_it_when_the_call_returns(threads_delivery: None) -> None:
    seen: list[str] = []
    started = threading.Event()

    def run() -> None:
        with handback._run.handling("sleeper"):
            try:
                with interruptible():
                    started.set()
                    time.sleep(1.0)  # one C call: no bytecode runs until it returns
                    seen.append("slept")
            except HandBack:
                seen.append("handed back")

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(10)
    at = time.monotonic()
    assert handback.interrupt_run("sleeper")
    thread.join(10)
    assert seen == ["handed back"]
    print(f"a run in time.sleep(1.0) got its hand-back {time.monotonic() - at:.2f} s after it was sent")
