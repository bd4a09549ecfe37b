"""Every stop a manager may ask for (issue 8, points 3 and 4).

SIGQUIT (supervisord's and ``honcho export``'s stopsignal) to every process
group, ``celery control shutdown``, a drain before the listener closes, and
a grace longer than honcho's SIGKILL window: each stops the busy set with
nothing killed and no job lost.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from tests.e2e.bindserver import Gunicorn, Target, request
from tests.e2e.checks import PROCESSES, assert_clean_stop, assert_shutdown_sequence
from tests.procset import ROOT, ProcessSet, free_port

DRAIN = 2.0


def entry_programs(ps: ProcessSet) -> list[psutil.Process]:
    """Every process of every Procfile entry but the `sh -c` each line runs in.

    supervisord's ``stopasgroup`` signals the whole group, shell included; here the shell
    is spared, so that its death (which the programs follow with SIGTERM) cannot race
    the SIGQUIT under test.
    """
    assert ps.proc is not None
    helpers = psutil.Process(ps.proc.pid).children()
    shells = [line for helper in helpers for line in helper.children()]
    assert len(shells) == len(PROCESSES), shells
    return [p for shell in shells for p in shell.children(recursive=True)]


def test_sigquit_to_every_process_is_as_graceful_as_sigterm(procset: ProcessSet) -> None:
    # supervisord with stopasgroup and honcho export's stopsignal=QUIT. Stock:
    # beat and the broker launcher die at once, gunicorn cuts the long poll,
    # Celery's pool children die with their jobs.
    procset.start()
    procset.wait_ready()
    short = procset.submit("sleep", seconds=1)
    long = procset.submit("sleep", seconds=12)
    for job_id in (short, long):
        procset.wait_status(job_id, "running")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        poll = pool.submit(procset.http, "GET", f"/jobs/{long}?wait=30")
        procset.wait_accepted(1)
        for program in entry_programs(procset):
            program.send_signal(signal.SIGQUIT)
        procset.wait(20)
        answer = poll.result(timeout=30)

    out = procset.output
    assert "sending SIGKILL" not in out, out
    assert answer.status == 200 and answer.body["status"] == "running", answer  # not cut
    for name in PROCESSES:
        lines = procset.lines(name)
        assert any("signal received: SIGQUIT" in line for line in lines), f"{name}:\n{out}"
        assert_shutdown_sequence(lines, name)
    stored = procset.stored_jobs()
    assert stored[short]["status"] == "succeeded", stored[short]
    assert (stored[long]["status"], stored[long]["attempts"]) == ("queued", 0), stored[long]
    assert not procset.survivors(), [p.cmdline() for p in procset.survivors()]


def test_celery_control_shutdown_hands_back_after_the_grace(procset: ProcessSet) -> None:
    # Celery's own `shutdown` command is a warm shutdown with no deadline: the
    # worker would wait 30 s for this job.
    procset.start()
    procset.wait_ready()
    long = procset.submit("sleep", seconds=30)
    procset.wait_status(long, "running")
    # No node replies to `shutdown` (the command's exit code is 69 even when it worked):
    # the worker's log is the proof.
    subprocess.run([sys.executable, "-m", "celery", "--app", "core.celery_app", "control", "shutdown"],
                   cwd=ROOT, env=procset.env, capture_output=True, timeout=30)
    procset.wait_for_line(r"shutdown requested by a remote control command", name="worker")
    procset.wait_for_line(r"grace of 3\.0 s used up: handing back 1 running task", name="worker")
    procset.wait(20)  # the worker exits; honcho stops the others

    assert "sending SIGKILL" not in procset.output, procset.output
    assert_shutdown_sequence(procset.lines("worker"), "worker",
                             ("graceful shutdown started", "closing ", "shutdown complete in "))
    stored = procset.stored_jobs()
    assert (stored[long]["status"], stored[long]["attempts"]) == ("queued", 0), stored[long]
    assert not procset.survivors(), [p.cmdline() for p in procset.survivors()]


class Prober:
    """GET /healthz and /readyz every 50 ms; every answer with the time it was asked."""

    def __init__(self, ps: ProcessSet) -> None:
        self.ps = ps
        self.answers: list[tuple[float, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in ("/healthz", "/readyz"):
                asked = time.monotonic()
                self.answers.append((asked, path, self.ps.http("GET", path, timeout=10).status))
            self._stop.wait(0.05)

    def between(self, start: float, end: float) -> list[tuple[float, str, int]]:
        return [a for a in self.answers if start <= a[0] < end]


def assert_drained(prober: Prober, signalled: float) -> None:
    """During the drain (its last 0.3 s aside): every request answered; /readyz 503."""
    during = prober.between(signalled + 0.1, signalled + DRAIN - 0.3)
    assert len(during) >= 10, during
    assert {status for _, path, status in during if path == "/healthz"} == {200}, during
    assert {status for _, path, status in during if path == "/readyz"} == {503}, during


def test_drain_keeps_serving_under_honcho(procset: ProcessSet) -> None:
    ps = procset.make(SHUTDOWN_DRAIN_SECONDS=str(DRAIN))
    ps.start()
    ps.wait_ready()
    with Prober(ps) as prober:
        signalled = time.monotonic()
        rc, _ = ps.stop_and_wait("sigterm")
    assert_clean_stop(ps, rc, 143)
    assert_drained(prober, signalled)
    ps.wait_for_line(r"draining for 2\.0 s", name="web")


def gunicorn_alone(tmp_path, drain: float) -> ProcessSet:
    """gunicorn run directly (PID 1 of a web container, systemd's main process), answering."""
    gunicorn = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"]
    ps = ProcessSet(tmp_path / "web", command=gunicorn, env={"SHUTDOWN_DRAIN_SECONDS": str(drain)})
    try:
        ps.start()
        ps.wait_for_line(r"Booting worker", timeout=30)
        deadline = time.monotonic() + 30
        while ps.http("GET", "/healthz").status != 200:
            assert time.monotonic() < deadline, ps.output
            time.sleep(0.05)
    except BaseException:
        ps.cleanup()
        raise
    return ps


def test_drain_when_only_the_master_gets_sigterm(tmp_path, procset: ProcessSet) -> None:
    # Kubernetes and systemd's KillMode=mixed signal PID 1 / the main process only:
    # the master tells its workers, and they drain too.
    ps = gunicorn_alone(tmp_path, DRAIN)
    try:
        workers = psutil.Process(ps.proc.pid).children()
        assert workers
        with Prober(ps) as prober:
            signalled = time.monotonic()
            ps.proc.send_signal(signal.SIGTERM)  # the master alone, not its group
            rc = ps.wait(20)
        assert rc == 0, ps.output
        assert_drained(prober, signalled)
        assert_shutdown_sequence(ps.lines(), "gunicorn")
        assert not ps.survivors()
    finally:
        ps.cleanup()


def test_a_grace_longer_than_honcho_allows_is_cut_to_fit(procset: ProcessSet) -> None:
    # One container with honcho as PID 1 and the 25 s meant for Kubernetes: honcho
    # SIGKILLs everything 5 s after beat exits. The set uses 3 s and hands back.
    ps = procset.make(SHUTDOWN_GRACE_SECONDS="25")
    ps.start()
    ps.wait_ready()
    ps.wait_for_line(r"SHUTDOWN_GRACE_SECONDS=25 does not fit honcho's SIGKILL 5 s into a stop: "
                     r"using 3 s", name="worker")
    long = ps.submit("sleep", seconds=30)
    ps.wait_status(long, "running")
    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130)
    stored = ps.stored_jobs()
    assert (stored[long]["status"], stored[long]["attempts"]) == ("queued", 0), stored[long]


def test_gunicorn_sighup_reloads_without_a_refused_or_failed_request(tmp_path) -> None:
    # A reload is not a stop: new workers boot, the old ones finish what they hold and leave;
    # the listener never closes, so nothing is refused, whatever the drain setting.
    ps = gunicorn_alone(tmp_path, 1.0)
    try:
        old = {p.pid for p in psutil.Process(ps.proc.pid).children()}
        with Prober(ps) as prober:
            ps.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while old & {p.pid for p in psutil.Process(ps.proc.pid).children()}:
                assert time.monotonic() < deadline, ps.output
                time.sleep(0.05)
        new = {p.pid for p in psutil.Process(ps.proc.pid).children()}
        assert new and not new & old
        health = [status for _, path, status in prober.answers if path == "/healthz"]
        assert len(health) >= 10 and set(health) == {200}, health
        rc, _ = ps.stop_and_wait("sigterm")
        assert rc == 0, ps.output
        assert not ps.survivors()
    finally:
        ps.cleanup()


SLOW_BOOT_APP = '''
import os, time
import stopright

time.sleep(float(os.environ["APP_IMPORT_SECONDS"]))  # a large app's imports, or a busy machine


def app(environ, start_response):
    stopping = stopright.shutdown_registry().shutting_down.is_set()
    start_response("503 Service Unavailable" if stopping else "200 OK", [("Content-Type", "text/plain")])
    return [b"stopping" if stopping else b"ready"]
'''


def test_a_worker_signalled_while_it_boots_says_not_ready_through_the_drain(tmp_path) -> None:
    # honcho's SIGTERM reached both workers while they were still loading the app (before
    # post_worker_init): they drained, but their readiness said 200 through the drain.
    drain = 4.0
    target = Target("127.0.0.1", free_port())
    server = Gunicorn(tmp_path, ["--bind", target.bind],
                      env={"SHUTDOWN_DRAIN_SECONDS": str(drain), "APP_IMPORT_SECONDS": "1.5"})
    (tmp_path / "bindapp.py").write_text(SLOW_BOOT_APP)
    answers: list[str] = []
    try:
        server.start()
        server.wait_for(r"Booting worker with pid", count=2)
        signalled = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)
        while time.monotonic() < signalled + drain - 0.3:
            outcome, body = request(target, timeout=10)
            if outcome != "refused":
                answers.append(f"{outcome}:{body.decode()}")
            time.sleep(0.05)
        rc = server.proc.wait(60)
    finally:
        server.cleanup()
    assert rc == 0, server.output
    assert len(answers) >= 5, (answers, server.output)  # the workers served during the drain
    assert set(answers) == {"5xx:stopping"}, (answers, server.output)
