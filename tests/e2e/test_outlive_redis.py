"""``python -m stopright.outlive -- redis-server ...`` with a real server (the embedded broker's binary).

What a Procfile's ``redis:`` entry needs at a stop: honcho's ``killpg(SIGTERM)``
to the entry's group does not reach the server; the server serves its
clients until they have gone (or the budget is spent), then saves and exits;
a SIGKILLed outlive leaves no server behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from tests.e2e.checks import assert_shutdown_sequence
from tests.procset import ROOT, free_port, redis_server_dir


class Outlive:
    """One ``python -m stopright.outlive`` in a session (a process group) of its own, as honcho runs it."""

    def __init__(self, workdir: Path, *options: str, unix: bool = False) -> None:
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        server = redis_server_dir(workdir / "bin") / "redis-server"  # the name a Procfile uses
        self.port = free_port()
        self.socket = workdir / "redis.sock" if unix else None  # only a Unix socket, no TCP port
        listen = ["--port", "0", "--unixsocket", str(self.socket)] if self.socket else \
            ["--port", str(self.port), "--bind", "127.0.0.1"]
        command = [sys.executable, "-m", "stopright.outlive", *options, "--", str(server),
                   *listen, "--dir", str(data), "--save", ""]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SHUTDOWN_", "HONCHO_"))}
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        started = self.wait_for("running as pid")
        self.server = psutil.Process(int(re.search(r"running as pid (\d+)", started)[1]))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout} s:\n" + "\n".join(self.lines))

    def wait_for_any(self, *texts: str, timeout: float = 30) -> str:
        """The first line holding one of ``texts``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if any(text in line for text in texts)]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"none of {texts} within {timeout} s:\n" + "\n".join(self.lines))

    def client(self) -> redis.Redis:
        deadline = time.monotonic() + 30
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5) if self.socket else \
            redis.Redis(port=self.port, socket_timeout=5)
        while True:
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "\n".join(self.lines)
                time.sleep(0.05)

    def group_signal(self, signum: int) -> None:
        """What honcho does to every entry: the whole process group of the entry."""
        os.killpg(self.proc.pid, signum)

    def finish(self, timeout: float = 20) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def cleanup(self) -> None:
        for process in (self.server, psutil.Process(self.proc.pid) if self.proc.poll() is None else None):
            try:
                if process is not None:
                    process.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[Outlive]]:
    started: list[Outlive] = []
    yield started
    for run in started:
        run.cleanup()


def gone(process: psutil.Process, timeout: float = 10) -> bool:
    try:
        process.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


def test_the_server_outlives_the_group_signal_until_its_clients_leave(tmp_path: Path, runs) -> None:
    run = Outlive(tmp_path)
    runs.append(run)
    client = run.client()
    client.set("queued", "job")
    run.group_signal(signal.SIGTERM)
    run.wait_for("waiting up to")  # the signal is handled, and the client seen
    assert client.get("queued") == b"job"  # served after the group's SIGTERM
    assert run.proc.poll() is None and run.server.is_running()
    client.close()
    assert run.finish() == 0, "\n".join(run.lines)
    assert gone(run.server)
    assert_shutdown_sequence(run.lines, "outlive", (
        "signal received: SIGTERM", "graceful shutdown started", "waiting up to 5.0 s for 1 client",
        "every client connection closed", "closing redis-server", "closed redis-server",
        "shutdown complete in "))


def test_a_client_on_the_unix_socket_holds_the_server_until_it_leaves(tmp_path: Path, runs) -> None:
    """redis-server --unixsocket (PostgreSQL's socket alike): its clients count as TCP ones do."""
    run = Outlive(tmp_path, unix=True)
    runs.append(run)
    client = run.client()
    client.set("queued", "job")
    run.group_signal(signal.SIGTERM)
    first = run.wait_for_any("waiting up to", "closing redis-server")
    assert "waiting up to 5.0 s for 1 client" in first, "\n".join(run.lines)  # not stopped at once
    assert client.get("queued") == b"job"  # served after the group's SIGTERM
    assert run.proc.poll() is None and run.server.is_running()
    client.close()
    assert run.finish() == 0, "\n".join(run.lines)
    assert gone(run.server)
    assert_shutdown_sequence(run.lines, "outlive", (
        "signal received: SIGTERM", "waiting up to 5.0 s for 1 client", "every client connection closed",
        "closed redis-server", "shutdown complete in "))


def test_a_client_that_stays_does_not_hold_the_stop(tmp_path: Path, runs) -> None:
    run = Outlive(tmp_path, "--linger", "0.5")
    runs.append(run)
    client = run.client()
    run.group_signal(signal.SIGINT)
    assert run.finish() == 0, "\n".join(run.lines)
    assert gone(run.server)
    assert_shutdown_sequence(run.lines, "outlive", (
        "signal received: SIGINT", "1 client connection(s) still open after 0.5 s", "closed redis-server",
        "shutdown complete in "))
    with pytest.raises(redis.ConnectionError):
        client.ping()
    client.close()


def test_a_killed_outlive_leaves_no_server_behind(tmp_path: Path, runs) -> None:
    run = Outlive(tmp_path)
    runs.append(run)
    run.client().close()
    run.proc.kill()  # honcho's SIGKILL: no handler runs; the kernel's PDEATHSIG stops the server
    assert run.finish() == -signal.SIGKILL
    assert gone(run.server), f"redis-server {run.server.pid} outlived a killed outlive"
