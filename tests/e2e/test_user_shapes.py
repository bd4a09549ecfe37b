"""The shapes users write (issue 14, point 4), each on the real program: it works, or its start says why.

Small apps written for each test, run alone (no honcho) on a RabbitMQ vhost:
``install()`` before ``config_from_object`` (the Flask docs' order), a task
base not derived from HandBackTask, closers registered before the fork of
Celery's pool and of gunicorn ``--preload`` (with and without ``forks=True``),
settings changed after ``install()``, a beat scheduler of the user's own.
The Flask docs' pattern as a whole, stopped busy: test_flask_app.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.e2e.checks import assert_shutdown_sequence
from tests.procset import ProcessSet
from tests.rabbitmq_node import Vhost

CELERY = [sys.executable, "-m", "celery", "--app", "shapeapp"]
WORKER = [*CELERY, "worker", "--loglevel", "INFO", "--concurrency", "2", "--without-mingle",
          "--without-gossip"]
BEAT = [*CELERY, "beat", "--loglevel", "INFO"]

APP = '''
import os
from celery import Celery, Task, signals
import stopright

stopright.register("app database", lambda: None)  # forks=None: a forked child lacks it
stopright.register("shared pool", lambda: print(f"shared pool closed in {{os.getpid()}}", flush=True),
                   forks=True)


class Plain(Task):
    pass


app = Celery("shapeapp", task_cls=stopright.HandBackTask)
stopright.install(app)
app.config_from_object({{"broker_url": "{broker}", "worker_prefetch_multiplier": 4}})
{extra}

@signals.worker_shutting_down.connect
def told(sig, how, exitcode, **_):
    print(f"worker_shutting_down: {{sig}} {{how}} {{exitcode}}", flush=True)

@app.task(base=Plain)
def legacy():
    return 1


@app.task
def fine():
    return 2
'''


def shape_app(directory: Path, broker: str, extra: str = "") -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "shapeapp.py").write_text(APP.format(broker=broker, extra=textwrap.dedent(extra)))
    return directory


def program(tmp_path: Path, command: list[str], cwd: Path) -> ProcessSet:
    return ProcessSet(tmp_path, command=command, cwd=cwd)


def exit_code(ps: ProcessSet, timeout: float = 60) -> int:
    """The program's exit code; it must exit by itself (a start that should have been refused)."""
    rc = ps.terminal.wait(timeout)
    assert rc is not None, f"still running after {timeout} s:\n{ps.output}"
    ps.terminal.join_reader(2)
    return rc


def test_worker_names_what_a_stop_cannot_hand_back_and_what_its_forks_leave_behind(
        tmp_path: Path, rabbitmq: Vhost) -> None:
    ps = program(tmp_path, WORKER, shape_app(tmp_path / "app", rabbitmq.url))
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", 60)
        subprocess.run([sys.executable, "-c", "import shapeapp; shapeapp.fine.delay()"], cwd=tmp_path / "app",
                       env=ps.env, check=True, timeout=60)
        ps.wait_for_line(r"Task shapeapp.fine\[.*\] succeeded", 60)  # consumer and pool at work
        rc, _ = ps.stop_and_wait("sigterm", timeout=30)
        out = ps.output
        # install() before config_from_object: what it set and what it kept, each said once.
        assert rc == 0, out
        [changed] = [line for line in ps.lines() if "Celery settings set by stopright: " in line]
        assert "task_acks_late=True (was False)" in changed and "worker_prefetch_multiplier" not in changed
        [kept] = [line for line in ps.lines() if "left as it is" in line]
        assert "WARNING" in kept and "worker_prefetch_multiplier=4 left as it is: the app's own" in kept, out
        assert "worker_shutting_down: SIGTERM Warm 0" in out, out  # the app's receiver still hears it
        handed = [line for line in ps.lines() if "will not be handed back at a stop" in line]
        assert len(handed) == 1 and "shapeapp.legacy" in handed[0] and "shapeapp.fine" not in handed[0], out
        assert "WARNING" in handed[0] and "stopright.HandBackTask" in handed[0], handed
        behind = [line for line in ps.lines() if "do not inherit" in line]
        assert len(behind) == 1 and "app database" in behind[0], out
        assert "shared pool" not in behind[0] and "celery broker connections" not in behind[0], behind
        # forks=True: each pool child ran the handler the MainProcess registered, for itself.
        closed_in = set(re.findall(r"shared pool closed in (\d+)", out))
        assert str(ps.proc.pid) in closed_in and len(closed_in - {str(ps.proc.pid)}) == 2, out
        assert_shutdown_sequence(ps.lines(), "worker")
        assert not ps.survivors()
    finally:
        ps.cleanup()


@pytest.mark.parametrize(("extra", "named"), [
    ("""
    app.conf.timezone  # anything that reads the configuration loads it; the next line then stays
    app.conf.task_acks_late = False
    """, "task_acks_late=False (the app's; stopright needs True: "),
    ("app.conf.update(task_reject_on_worker_lost=False)", "task_reject_on_worker_lost=False (the app's; "),
], ids=["assigned-after-the-load", "updated-before"])
def test_a_setting_the_hand_back_needs_set_otherwise_stops_the_worker_at_start(
        tmp_path: Path, rabbitmq: Vhost, extra: str, named: str) -> None:
    app = shape_app(tmp_path / "app", rabbitmq.url, extra)
    ps = program(tmp_path, WORKER, app)
    try:
        ps.start()
        rc = exit_code(ps)
        assert rc != 0, ps.output
        assert "ValueError: stopright: Celery settings conflict with a stop that loses nothing: " in ps.output
        assert named in ps.output, ps.output
        assert "ready." not in ps.output, ps.output
        assert not ps.survivors()
    finally:
        ps.cleanup()


def test_beat_runs_stopright_scheduler_when_configured_after_install(tmp_path: Path, rabbitmq: Vhost) -> None:
    ps = program(tmp_path, [*BEAT, "--schedule", str(tmp_path / "schedule")],
                 shape_app(tmp_path / "app", rabbitmq.url))
    try:
        ps.start()
        ps.wait_for_line(r"beat: Starting", 60)
        assert ". scheduler -> stopright.celery_beat.Scheduler" in ps.output, ps.output
        rc, _ = ps.stop_and_wait("sigterm", timeout=30)
        assert rc == 0, ps.output
        assert_shutdown_sequence(ps.lines(), "beat")
    finally:
        ps.cleanup()


def test_beat_with_a_scheduler_of_its_own_says_what_to_mix_in(tmp_path: Path, rabbitmq: Vhost) -> None:
    extra = """
    from celery.beat import PersistentScheduler

    class MyScheduler(PersistentScheduler):
        pass

    app.conf.beat_scheduler = "shapeapp:MyScheduler"
    """
    ps = program(tmp_path, [*BEAT, "--schedule", str(tmp_path / "schedule")],
                 shape_app(tmp_path / "app", rabbitmq.url, extra))
    try:
        ps.start()
        rc = exit_code(ps)
        assert rc != 0, ps.output
        assert "stopright: beat runs shapeapp.MyScheduler, which does not stop right" in ps.output, ps.output
        assert "class Scheduler(stopright.StopRightBeat, MyScheduler)" in ps.output, ps.output
        assert not ps.survivors()
    finally:
        ps.cleanup()


WSGI = '''
import os
import stopright

stopright.register("web pool", lambda: print(f"web pool closed in {os.getpid()}", flush=True), forks=True)
stopright.register("master only", lambda: None)


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
'''


def test_gunicorn_preload_workers_inherit_forks_true_and_the_master_names_the_rest(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "wsgiapp.py").write_text(WSGI)
    ps = program(tmp_path, [sys.executable, "-m", "gunicorn", "--config", "python:stopright.gunicorn_hooks",
                            "--preload", "--workers", "2", "--bind", "127.0.0.1:0", "wsgiapp:app"],
                 tmp_path / "app")
    try:
        ps.start()
        deadline = time.monotonic() + 60
        while len(workers := set(re.findall(r"Booting worker with pid: (\d+)", ps.output))) < 2:
            assert time.monotonic() < deadline, ps.output
            time.sleep(0.05)
        behind = [line for line in ps.lines() if "do not inherit" in line]
        assert len(behind) == 1 and "master only" in behind[0] and "web pool" not in behind[0], ps.output
        ps.signal(signal.SIGTERM)
        assert exit_code(ps) == 0, ps.output
        disposed = set(re.findall(r"web pool closed in (\d+)", ps.output))
        assert workers <= disposed, ps.output  # each worker closed its own, and the master its own
        assert not ps.survivors()
    finally:
        ps.cleanup()


def test_a_stop_while_the_worker_starts_is_stoprights_bounded_stop(tmp_path: Path, rabbitmq: Vhost) -> None:
    # From Celery's stop handlers (installed after the banner) to worker_ready (the pool starting,
    # the broker connecting: seconds on a loaded machine), Celery's own stop ran: the group's SIGTERM
    # killed the pool children, and its pool drain once held a worker until Heroku's SIGKILL.
    extra = """
    import time
    from celery import bootsteps

    class SlowStart(bootsteps.StartStopStep):
        def start(self, c):
            print("consumer starting slowly", flush=True)
            time.sleep(2)

    app.steps["consumer"].add(SlowStart)
    """
    ps = program(tmp_path, WORKER, shape_app(tmp_path / "app", rabbitmq.url, extra))
    try:
        ps.start()
        ps.wait_for_line(r"consumer starting slowly", 60)
        assert "ready." not in ps.output, ps.output
        os.killpg(os.getpgid(ps.proc.pid), signal.SIGTERM)  # as honcho and Heroku: the whole group
        rc = exit_code(ps)
        out = ps.output
        assert rc == 0, out
        assert "signal received: SIGTERM" in out and "Warm shutdown (MainProcess)" not in out, out
        assert "exited with 'signal" not in out, out  # no pool child died of the group's signal
        assert_shutdown_sequence(ps.lines(), "worker")
        assert not ps.survivors()
    finally:
        ps.cleanup()
