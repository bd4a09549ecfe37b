"""``running_requests()`` never reads "nothing running" while tasks run (issue 14, code-read list).

The stop's watchdog polls it through the grace; an empty answer ends the
grace at once and the pool's children are killed half a second later. It
read Celery's ``state.active_requests`` (a WeakSet) by iterating it, which
raises ``RuntimeError`` when another thread adds a request meanwhile (the
threads pool's task threads do, and prefork's event loop); after 10 such
errors in a row it returned ``[]``.
"""

from __future__ import annotations

import sys
import threading

from celery.worker import state

from stopright.upstream import celery as celery_internals


class Running:
    """A request as the watchdog sees it: running in a pool child (``worker_pid`` set)."""

    def __init__(self, pid: int) -> None:
        self.worker_pid = pid


def test_a_busy_set_of_requests_never_reads_as_empty() -> None:
    long_running = [Running(1000 + n) for n in range(20_000)]  # a large set: a long iteration
    for request in long_running:
        state.active_requests.add(request)
    stop = threading.Event()

    def churn() -> None:  # short tasks accepted and finished by other threads, as fast as they come
        while not stop.is_set():
            short = [Running(1) for _ in range(50)]
            for request in short:
                state.active_requests.add(request)
            for request in short:
                state.active_requests.discard(request)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows: the race, every time
    threads = [threading.Thread(target=churn, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        empty = sum(1 for _ in range(100) if not celery_internals.running_requests())
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        sys.setswitchinterval(switch)
        for request in long_running:
            state.active_requests.discard(request)
    assert empty == 0, f"{empty} of 100 reads said nothing runs while 20,000 requests ran"


def test_requests_not_yet_in_a_pool_child_are_not_running() -> None:
    accepted, reserved = Running(4242), Running(0)  # worker_pid 0/None: not accepted by a child yet
    state.active_requests.add(accepted)
    state.active_requests.add(reserved)
    try:
        assert celery_internals.running_requests() == [accepted]
    finally:
        state.active_requests.discard(accepted)
        state.active_requests.discard(reserved)
