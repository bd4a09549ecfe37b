"""Two real beats on one PostgreSQL (two hosts, or a rollout's overlap): one schedules, the other takes over.

Each beat has a VAR_DIR of its own (its own schedule file, as on its own
host); both share the database and a Redis broker. A test-only app module
adds an entry, ``count-me``, that sends a message to a queue nobody reads,
stamped with the sending beat's pid and time: the messages in that list are
the entry's runs. Sweeps are counted in each beat's log.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.checks import assert_shutdown_sequence
from tests.procset import ROOT, ProcessSet
from tests.servers import PostgresServer

LEASE = 3.0
COUNT_EVERY = 2.0  # the counted entry's interval
SWEEP_EVERY = 1.0
QUEUE = "leader-count"
SENT = "Scheduler: Sending due task"
#: A run earlier than its interval after the one before: run twice. (Celery sends a hair early.)
EARLY = 0.3

APP_MODULE = f'''
import os, time
from celery import signals
from tasks.beat_app import app

app.conf.beat_schedule = {{**app.conf.beat_schedule, "count-me": {{
    "task": "leader_test.count", "schedule": {COUNT_EVERY}, "options": {{"queue": "{QUEUE}"}}}}}}


@signals.before_task_publish.connect
def _stamp(sender=None, headers=None, **_):
    if sender == "leader_test.count":
        headers["sent_at"] = time.time()
        headers["beat_pid"] = os.getpid()
'''


class Beat:
    """``celery beat`` with the test app, its output read line by line (each stamped on arrival)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.env = ProcessSet(workdir, env=env).env  # a VAR_DIR of its own, no developer settings
        self.env["PYTHONPATH"] = str(workdir.parent / "app")
        self.proc = subprocess.Popen([sys.executable, "-m", "celery", "--app", "leader_test_app", "beat",
                                      "--loglevel", "INFO"], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(text for _, text in self.lines)

    def count(self, pattern: str) -> int:
        return sum(1 for _, text in self.lines if re.search(pattern, text))

    def wait_for(self, pattern: str, timeout: float = 60, times: int = 1) -> tuple[float, str]:
        """When the ``times``-th line matching ``pattern`` arrived, and that line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [(at, text) for at, text in self.lines if regex.search(text)]
                if len(found) >= times:
                    return found[times - 1]
                left = deadline - time.monotonic()
                assert left > 0 and (self.proc.poll() is None or self._reader.is_alive()), \
                    f"no {times} line(s) matching {pattern!r} (pid {self.pid}):\n{self.output}"
                self._changed.wait(min(left, 0.5))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(signum)
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)


@pytest.fixture
def beats(tmp_path: Path, postgres: PostgresServer, redis_url: str) -> Iterator:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "leader_test_app.py").write_text(APP_MODULE)
    env = {"DATABASE_URL": postgres.url, "REDIS_URL": redis_url, "SWEEP_INTERVAL_SECONDS": str(SWEEP_EVERY),
           "BEAT_LEASE_SECONDS": str(LEASE)}
    started: list[Beat] = []

    def start(name: str) -> Beat:
        beat = Beat(tmp_path / name, env)
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.kill()
        if beat.proc.stdout is not None:
            beat.proc.stdout.close()


def logged_at(beats: list[Beat], pattern: str) -> list[float]:
    """When the beats logged lines matching ``pattern`` (their own clock, seconds of the day), in order."""
    times = []
    for beat in beats:
        for _, text in beat.lines:
            stamp = re.match(r"(\d\d):(\d\d):(\d\d\.\d+) beat\[", text)
            if stamp and re.search(pattern, text):
                hours, minutes, seconds = stamp.groups()
                times.append(int(hours) * 3600 + int(minutes) * 60 + float(seconds))
    return sorted(times)


def runs(redis_url: str) -> list[tuple[float, int]]:
    """The counted entry's messages: (sent at, by which beat), oldest first."""
    with redis.Redis.from_url(redis_url) as client:
        raw = client.lrange(QUEUE, 0, -1)
    stamped = [json.loads(item)["headers"] for item in raw]
    return sorted((h["sent_at"], h["beat_pid"]) for h in stamped)


def wait_for_runs(redis_url: str, beat: Beat, times: int, timeout: float = 30) -> list[tuple[float, int]]:
    """The entry's messages once ``beat`` has published ``times`` of them.

    Beat logs "Sending due task" before it publishes: a log line is not yet a message.
    """
    deadline = time.monotonic() + timeout
    while True:
        sent = runs(redis_url)
        if sum(1 for _, pid in sent if pid == beat.pid) >= times:
            return sent
        assert time.monotonic() < deadline and beat.proc.poll() is None, \
            f"no {times} message(s) from beat {beat.pid}: {sent}\n{beat.output}"
        time.sleep(0.05)


def gaps(sent: list[tuple[float, int]]) -> list[float]:
    return [round(b[0] - a[0], 2) for a, b in zip(sent, sent[1:], strict=False)]


def leader_and_standby(start) -> tuple[Beat, Beat]:
    first = start("a")
    first.wait_for(r"leader: leading \(lease ")
    second = start("b")
    second.wait_for(rf"leader: standby: \S+:{first.pid}:\w+ leads")
    return first, second


def assert_stopped_cleanly(beat: Beat, rc: int) -> None:
    assert rc == 0, beat.output
    assert "Traceback" not in beat.output, beat.output
    assert_shutdown_sequence([text for _, text in beat.lines], "beat")


def test_two_beats_schedule_each_run_once(beats, redis_url: str) -> None:
    leader, standby = leader_and_standby(beats)
    # Six sweeps and three counted runs with both beats up, from the standby's first look on.
    leader.wait_for(f"{SENT} requeue-stranded-jobs", times=leader.count(f"{SENT} requeue-stranded-jobs") + 6)
    leader.wait_for(f"{SENT} count-me", times=leader.count(f"{SENT} count-me") + 3)
    assert standby.count(SENT) == 0, standby.output
    assert standby.count(r"leader: leading") == 0, standby.output
    assert standby.count(r"Sending due task requeue-stranded-jobs .* to the sweeper thread") == 0
    sent = runs(redis_url)
    assert {pid for _, pid in sent} == {leader.pid}, sent
    assert min(gaps(sent)) >= COUNT_EVERY - EARLY, gaps(sent)
    assert max(gaps(sent)) < 2 * COUNT_EVERY, gaps(sent)
    sweeps = logged_at([leader, standby], f"{SENT} requeue-stranded-jobs")
    assert min(gaps([(at, 0) for at in sweeps])) >= SWEEP_EVERY - EARLY, sweeps  # one sweep a second
    assert standby.proc.poll() is None  # standing by all along
    assert_stopped_cleanly(standby, standby.stop())
    assert "leader lease released" not in standby.output  # it never held it
    assert_stopped_cleanly(leader, leader.stop())


def test_a_stopped_leaders_standby_takes_over_within_a_poll(beats, redis_url: str) -> None:
    leader, standby = leader_and_standby(beats)
    wait_for_runs(redis_url, leader, 2)
    stopped_at = time.monotonic()  # just after a run: the next is due one interval from now
    rc = leader.stop()
    took_over_at, line = standby.wait_for(r"leader: leading \(took over after", timeout=30)
    print(f"takeover after SIGTERM: {took_over_at - stopped_at:.2f} s ({line})")
    assert took_over_at - stopped_at < 1 + 2.5, line  # ~1 s (a poll), with room for a loaded machine
    assert "from a released lease" in line, line
    assert_stopped_cleanly(leader, rc)
    assert "leader lease released" in leader.output, leader.output
    sent = wait_for_runs(redis_url, standby, 2)
    pids = [pid for _, pid in sent]
    assert pids == sorted(pids, key=lambda pid: pid != leader.pid), sent  # the leader's, then the other's
    assert min(gaps(sent)) >= COUNT_EVERY - EARLY, gaps(sent)  # no interval run twice ...
    assert max(gaps(sent)) < 2 * COUNT_EVERY - EARLY, gaps(sent)  # ... nor one skipped
    sweeps = logged_at([leader, standby], f"{SENT} requeue-stranded-jobs")
    assert min(gaps([(at, 0) for at in sweeps])) >= SWEEP_EVERY - EARLY, sweeps  # never two at once
    assert_stopped_cleanly(standby, standby.stop())


def test_a_killed_leaders_standby_takes_over_once_the_lease_lapses(beats, redis_url: str) -> None:
    leader, standby = leader_and_standby(beats)
    wait_for_runs(redis_url, leader, 2)
    killed_at = time.monotonic()
    leader.kill()  # SIGKILL: no release
    took_over_at, line = standby.wait_for(r"leader: leading \(took over after", timeout=30)
    waited = took_over_at - killed_at
    print(f"takeover after SIGKILL: {waited:.2f} s ({line})")
    since = float(re.search(r"took over after ([\d.]+) s", line).group(1))
    assert re.search(rf"from \S+:{leader.pid}:\w+, whose lease lapsed", line), line
    # The lease ran out first: its last renewal was at most a renewal period before the kill.
    assert waited > LEASE - LEASE / 3 - 0.2, line
    assert LEASE <= since < LEASE + 1 + 2, line  # lease + ~1 s, with room for a loaded machine
    sent = wait_for_runs(redis_url, standby, 2)
    mine = [at for at, pid in sent if pid == standby.pid]
    assert len(mine) >= 2 and all(pid == leader.pid for _, pid in sent[:-len(mine)]), sent
    assert min(gaps(sent)) >= COUNT_EVERY - EARLY, gaps(sent)  # the overdue run once, not twice
    catch_up = mine[0] - (took_over_at - time.monotonic() + time.time())
    assert catch_up < 1.5, (catch_up, sent)  # overdue at the takeover: run at once
    assert_stopped_cleanly(standby, standby.stop())
