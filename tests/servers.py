"""Throwaway servers for the tests: own data dir, free ports, full logging.

PostgreSQL: its log is the server's own account of how each client left:
with ``log_disconnections`` every end is logged, and ``log_min_messages =
debug1`` adds ``unexpected EOF on client connection`` for a client that
vanished without saying goodbye (a connection that was not closed properly).

RabbitMQ: likewise, in tests/rabbitmq_node.py.

Redis: an external redis-server on TCP with AOF, for ``REDIS_URL`` and its
outages (:class:`RedisServer`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import psutil
import pytest
import redis

from broker.launcher import redis_server_binary
from tests.netns import command as in_netns
from tests.netns import run_in
from tests.procset import free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def find_pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    for candidate in PG_BIN_DIRS:
        if (candidate / "initdb").exists():
            return candidate
    return None


class PostgresServer:
    """``netns``/``listen``: the server runs in that network namespace on that address (tests/hosts.py);
    the test reaches it through its Unix socket (:attr:`socket_url`) from anywhere."""

    def __init__(self, bindir: Path, *, netns: str | None = None, listen: str = "127.0.0.1",
                 max_connections: int = 100) -> None:
        # Its own directory outside pytest's (whose parents are private to root):
        # the server runs as the postgres user when we are root.
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.bindir = bindir
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._frozen: list[psutil.Process] = []  # stopped by freeze(), until thaw()
        # PostgreSQL refuses to run as root; CI runs as root.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.netns = netns
        self.listen = listen
        self.max_connections = max_connections

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.listen}:{self.port}/postgres"

    @property
    def socket_url(self) -> str:
        return f"postgresql+psycopg://postgres@/postgres?host={self.root}&port={self.port}"

    def _as_user(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *command] if self.user else command

    def start(self) -> None:
        """Start the server; the first start creates its data dir, a restart reuses it (same port)."""
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        if not self.data.exists():
            subprocess.run(self._as_user([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                                          "-U", "postgres", "--no-sync"]),
                           check=True, capture_output=True, timeout=120)
            if self.listen != "127.0.0.1":  # clients on other hosts (namespaces of the test's own)
                with open(self.data / "pg_hba.conf", "a") as hba:
                    hba.write("host all all 0.0.0.0/0 trust\n")
        with open(self.log, "ab") as log:  # the server keeps its own copy of the fd
            self.proc = subprocess.Popen(
                in_netns(self.netns, self._as_user([
                    str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                    "-c", f"listen_addresses={self.listen}", "-c", f"max_connections={self.max_connections}",
                    "-c", f"unix_socket_directories={self.root}",
                    "-c", "log_connections=on", "-c", "log_disconnections=on",
                    "-c", "log_min_messages=debug1", "-c", "fsync=off"])),
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-h", str(self.root),
                                    "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()}")

    def _postmaster(self) -> psutil.Process:
        return psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))

    def freeze(self) -> None:
        """Up but not answering: SIGSTOP the postmaster and every backend (a stuck disk, a VM paused).

        The kernel still completes TCP handshakes into the listen backlog and acknowledges
        data: a client sees a server that accepts and then never answers.
        """
        postmaster = self._postmaster()
        self._frozen = [postmaster, *postmaster.children(recursive=True)]
        for process in self._frozen:
            process.suspend()

    def thaw(self) -> None:
        # As root, runuser stands between us and the postmaster and stops itself when its child
        # stops (su's job control): it is continued too, or it never reaps the postmaster.
        wrapper = [psutil.Process(self.proc.pid)] if self._frozen and self.proc and self.user else []
        for process in [*self._frozen, *wrapper]:
            try:
                process.resume()
            except psutil.NoSuchProcess:
                pass
        self._frozen = []

    def stop(self, *, fast: bool = False) -> None:
        """Smart shutdown (waits for clients to leave), or fast: ends every session at once (an outage)."""
        self.thaw()  # a frozen server handles no signal
        if self.proc and self.proc.poll() is None:
            # To the postmaster itself: as root, self.proc is runuser, which does not pass SIGINT on.
            try:
                postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(postmaster, signal.SIGINT if fast else signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class RedisServer:
    """An external redis-server on a fixed port with AOF, that a test can stop and start again."""

    def __init__(self, data: Path, db: int = 0, *, netns: str | None = None, bind: str = "127.0.0.1") -> None:
        """``netns``/``bind``: the server runs in that network namespace on that address."""
        self.data = data
        self.db = db
        self.port = free_port()
        self.netns, self.bind = netns, bind
        self.proc: subprocess.Popen[bytes] | None = None
        data.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}/{self.db}"

    def start(self) -> None:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", self.bind, "--dir", str(self.data),
                "--appendonly", "yes", "--save", "", "--loglevel", "warning", "--protected-mode", "no"]
        self.proc = subprocess.Popen(in_netns(self.netns, argv), stdout=subprocess.DEVNULL,
                                     start_new_session=True)

        def wait_answer() -> None:
            with redis.Redis.from_url(self.url) as client:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        client.ping()
                        return
                    except redis.ConnectionError:
                        assert time.monotonic() < deadline and self.proc.poll() is None, "redis did not start"
                        time.sleep(0.05)

        run_in(self.netns, wait_answer)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # writes its AOF and exits
            self.proc.wait(10)


def missing(what: str, variable: str) -> NoReturn:
    """Something a test needs is not on this machine: a failure under CI or ``variable``, else a skip.

    CI installs every server the tests use (.ci/run); a skip there would
    count a test as done that never ran.
    """
    if os.environ.get(variable) or os.environ.get("CI") == "true":
        pytest.fail(f"{variable} or CI is set, but {what}")
    pytest.skip(what)
