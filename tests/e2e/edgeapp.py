"""A Celery app as a user writes it, with stopright's lines, and what some apps do at start (tests/e2e).

Copied into a test's directory and run as ``celery --app edgeapp worker``; each
environment variable turns on one thing a real app may do:

* ``EDGE_FDS=N``: hold N more open files (hundreds of connections, a raised
  descriptor limit): the stop's own pipes then get numbers above 1024;
* ``EDGE_WAKEUP=1``: set a signal wakeup descriptor of its own (an asyncio
  loop, a library's), read by a thread that prints each signal it reports;
* ``EDGE_ATEXIT=S``: an ``atexit`` handler (an error reporter's or a tracer's
  flush) that takes S seconds, then writes ``EDGE_MARK``;
* ``EDGE_NO_PDEATHSIG=1``: pool children lose the parent-death signal Celery
  gives them (as a library resetting it would): orphaned when the
  MainProcess is killed;
* ``EDGE_BROKER``: the broker URL; ``EDGE_LEDGER``: where each run notes its
  start and end (no job ledger here: the file only lets the test count runs).
"""

import atexit
import os
import resource
import signal
import sys
import threading
import time

from celery import Celery, signals
from celery.concurrency import prefork

import stopright

app = Celery("edgeapp", broker=os.environ["EDGE_BROKER"], task_cls=stopright.HandBackTask)
stopright.install(app)

_held = []
if os.environ.get("EDGE_FDS"):
    wanted = int(os.environ["EDGE_FDS"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted + 256), hard))
    _held = [os.open(os.devnull, os.O_RDONLY) for _ in range(wanted)]
    print(f"edgeapp holds descriptors up to {_held[-1]}", file=sys.stderr, flush=True)

if os.environ.get("EDGE_WAKEUP"):
    _read, _write = os.pipe()
    os.set_blocking(_write, False)
    signal.set_wakeup_fd(_write)

    def _report() -> None:
        while True:
            for signum in os.read(_read, 64):
                os.write(2, f"user wakeup fd: signal {signum}\n".encode())

    threading.Thread(target=_report, name="user-wakeup", daemon=True).start()

if os.environ.get("EDGE_NO_PDEATHSIG"):
    @signals.worker_process_init.connect
    def _lose_pdeathsig(**_: object) -> None:
        import ctypes

        ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG, none

if os.environ.get("EDGE_ATEXIT"):
    def _flush() -> None:
        time.sleep(float(os.environ["EDGE_ATEXIT"]))
        with open(os.environ["EDGE_MARK"], "w") as f:
            f.write("flushed")

    atexit.register(_flush)


class CustomPool(prefork.TaskPool):
    """An app's own pool (``-P custom``, ``CELERY_CUSTOM_WORKER_POOL``), built on Celery's prefork."""


@app.task
def sleep(seconds):
    ledger = os.environ.get("EDGE_LEDGER")
    me = f"{sleep.request.id} {os.getpid()}"
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"start {me} {time.time()}\n")
    os.write(2, f"edgeapp task {sleep.request.id} started\n".encode())
    try:
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if ledger:
            with open(ledger, "a") as f:
                f.write(f"end {me} {time.time()}\n")
    return seconds
