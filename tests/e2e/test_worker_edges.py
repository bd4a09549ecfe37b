"""The worker's stop with what real apps do at start (issue 14, code-read list).

A user's app (tests/e2e/edgeapp.py: stopright's lines and nothing of the demo)
that holds hundreds of descriptors, sets a signal wakeup descriptor of its
own, or flushes something in ``atexit``. Each runs the real worker on a real
Redis; the stop comes while a task runs longer than the grace.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.procset import ROOT, ProcessSet, free_port, redis_server_dir

APP = "tests.e2e.edgeapp"
LONG_SECONDS = 15  # longer than the 3 s grace: only a hand-back ends it in time


def worker(tmp_path: Path, broker: str, *, pool: str = "prefork", concurrency: int = 1,
           **env: str) -> ProcessSet:
    command = [sys.executable, "-m", "celery", "--app", APP, "worker", "--loglevel", "INFO",
               "--concurrency", str(concurrency), "--pool", pool, "--without-mingle", "--without-gossip"]
    return ProcessSet(tmp_path, command=command, env={"EDGE_BROKER": broker, **env})


def send(broker: str, seconds: float) -> str:
    """Queue ``edgeapp.sleep`` from a process of its own (no connection of the test's left open)."""
    code = ("import sys; from celery import Celery; app = Celery('send', broker=sys.argv[1]); "
            f"print(app.send_task('{APP}.sleep', args=[{seconds}]).id); app.close()")
    done = subprocess.run([sys.executable, "-c", code, broker], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.strip()


def test_descriptors_above_1024_leave_the_stop_its_deadlines(tmp_path: Path, redis_url: str) -> None:
    # select() refused the watchdog's pipe (ValueError: filedescriptor out of range): the
    # watchdog died at start, and the stop waited for the task however long it took.
    ps = worker(tmp_path, redis_url, EDGE_FDS="1100")
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60)
        task_id = send(redis_url, LONG_SECONDS)
        ps.wait_for_line(rf"edgeapp task {task_id} started", timeout=30)
        rc, _ = ps.stop_and_wait("sigterm", timeout=LONG_SECONDS + 30)
    finally:
        ps.cleanup()
    out = ps.output
    assert "edgeapp holds descriptors up to" in out, out
    assert "Traceback" not in out and "stop watchdog failed" not in out, out
    assert f"task {APP}.sleep[{task_id}] handed back to the queue" in out, out
    assert rc == 0, out
    assert not ps.survivors()


def test_a_thread_running_python_code_is_handed_back_under_the_threads_pool(tmp_path: Path,
                                                                            redis_url: str) -> None:
    # The worker sent SIGUSR2 to itself (Request.worker_pid is the MainProcess under threads) and died.
    ps = worker(tmp_path, redis_url, pool="threads")
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60)
        task_id = send(redis_url, LONG_SECONDS)
        ps.wait_for_line(rf"edgeapp task {task_id} started", timeout=30)
        rc, _ = ps.stop_and_wait("sigterm", timeout=LONG_SECONDS + 30)
    finally:
        ps.cleanup()
    out = ps.output
    assert f"task {APP}.sleep[{task_id}] handed back to the queue" in out, out  # raised in its thread
    assert "did not hand back" not in out and "Traceback" not in out, out
    assert rc == 0, out
    assert not ps.survivors()


@pytest.mark.parametrize(("pool", "runs"), [("processes", "(celery)"), ("custom", None)])
def test_a_pool_named_on_the_command_line_is_stopright_s_or_refused(tmp_path: Path, redis_url: str,
                                                                    pool: str, runs: str | None) -> None:
    # -P processes (Celery's alias of prefork) and a pool of the app's own silently replaced
    # stopright's pool: the stop's fixes were gone. prefork's banner names the pool's module.
    ps = worker(tmp_path, redis_url, pool=pool, CELERY_CUSTOM_WORKER_POOL=f"{APP}:CustomPool")
    try:
        ps.start()
        if runs is None:
            rc = ps.wait(60)
        else:
            ps.wait_for_line(r"\bready\.$", timeout=60)
            rc, _ = ps.stop_and_wait("sigterm", timeout=30)
    finally:
        ps.cleanup()
    out = ps.output
    if runs is None:
        refused = f"ValueError: stopright: the worker's pool {APP}:CustomPool is not one stopright can stop"
        assert rc != 0 and refused in out, out
        assert "ready." not in out, out
    else:
        assert f"concurrency: 1 {runs}" in out and rc == 0, out


def test_a_signal_wakeup_descriptor_of_the_app_keeps_working(tmp_path: Path, redis_url: str) -> None:
    # stopright's event-loop wake-up replaced the app's own descriptor without a word.
    ps = worker(tmp_path, redis_url, EDGE_WAKEUP="1")
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60)
        rc, _ = ps.stop_and_wait("sigterm", timeout=30)
    finally:
        ps.cleanup()
    out = ps.output
    assert "user wakeup fd: signal 15" in out, out
    assert "passes every signal on to it" in out, out  # and it says so, once
    assert rc == 0 and "shutdown complete in" in out, out
    assert not ps.survivors()


def test_an_atexit_flush_of_a_second_runs_to_completion_under_honcho(tmp_path: Path, redis_url: str) -> None:
    # The worker gave its atexit handlers what was left of a 1 s close window (at least 0.25 s):
    # a one-second flush was cut, and the stop logged an overrun.
    mark = tmp_path / "flushed"
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        f"worker: exec celery --app {APP} worker --loglevel INFO --concurrency 1 --without-mingle "
        "--without-gossip\n"
        "redis: python -m stopright.outlive -- redis-server --port $REDIS_PORT --dir $VAR_DIR --save ''\n")
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    path = str(redis_server_dir(tmp_path / "bin")) + os.pathsep + os.environ.get("PATH", "")
    ps = ProcessSet(tmp_path, procfile=procfile, cwd=ROOT,
                    env={"EDGE_BROKER": broker, "EDGE_ATEXIT": "1.0", "EDGE_MARK": str(mark),
                         "REDIS_PORT": str(port), "PATH": path})
    (tmp_path / "var").mkdir(exist_ok=True)
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60, name="worker")
        ps.snapshot()
        task_id = send(broker, LONG_SECONDS)
        ps.wait_for_line(rf"edgeapp task {task_id} started", timeout=30, name="worker")
        rc, stop_seconds = ps.stop_and_wait("ctrl_c", timeout=30)
    finally:
        ps.cleanup()
    out = ps.output
    assert rc == 130, out
    assert "worker.1 stopped (rc=0)" in out, out
    assert "SIGKILL" not in out and "stop phase overran" not in out, out
    assert f"task {APP}.sleep[{task_id}] handed back to the queue" in out, out
    assert mark.read_text() == "flushed"
    assert not ps.survivors()
    print(f"busy stop with a 1 s atexit flush: {stop_seconds:.2f} s, 0 SIGKILL")


@contextlib.contextmanager
def _busy_child(tmp_path: Path, redis_url: str, **env: str) -> Iterator[tuple[psutil.Process, ...]]:
    """A worker whose one pool child runs a long task: (MainProcess, child); both killed by pid at the end.

    Started without a terminal (a service, a container): a session leader's death in a terminal
    sends SIGHUP to its group, which would stop an orphan for a reason of the test's own.
    """
    ps = worker(tmp_path, redis_url, **env)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(ps.command, cwd=ROOT, env=ps.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    main = psutil.Process(proc.pid)
    seen = [main]
    try:
        _wait_for(log, r"\bready\.$")
        task_id = send(redis_url, 60)
        _wait_for(log, rf"edgeapp task {task_id} started")
        seen += main.children()
        assert len(seen) == 2, seen
        yield main, seen[1]
    finally:
        for p in seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        proc.wait(10)


def _wait_for(log: Path, pattern: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(errors="replace"), re.MULTILINE):
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)


def _gone(process: psutil.Process, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_pool_child_does_not_outlive_its_killed_main_process(tmp_path: Path, redis_url: str) -> None:
    # billiard sets no parent-death signal; Celery's process_initializer sets SIGKILL.
    with _busy_child(tmp_path, redis_url) as (main, child):
        main.kill()
        assert _gone(child), f"pool child {child.pid} outlived its MainProcess: {child.cmdline()}"


def test_an_orphaned_pool_child_stops_on_a_stop_signal(tmp_path: Path, redis_url: str) -> None:
    # A child that lost that signal ignored SIGTERM for ever: `kill <pid>` could not stop it.
    with _busy_child(tmp_path, redis_url, EDGE_NO_PDEATHSIG="1") as (main, child):
        main.kill()
        assert _gone(main)
        assert not _gone(child, timeout=1) and child.ppid() != main.pid  # an orphan now, still running
        child.terminate()
        assert _gone(child), f"orphaned pool child {child.pid} ignored SIGTERM"
