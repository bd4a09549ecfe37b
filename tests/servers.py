"""A throwaway PostgreSQL server for the tests: own data dir, free port, full logging.

Its log is the server's own account of how each client left: with
``log_disconnections`` every end is logged, and ``log_min_messages = debug1``
adds ``unexpected EOF on client connection`` for a client that vanished
without saying goodbye (a connection that was not closed properly).
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
    def __init__(self, bindir: Path) -> None:
        # Its own directory outside pytest's (whose parents are private to root):
        # the server runs as the postgres user when we are root.
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.bindir = bindir
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # PostgreSQL refuses to run as root; CI runs as root.
        self.user = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

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
        with open(self.log, "ab") as log:  # the server keeps its own copy of the fd
            self.proc = subprocess.Popen(
                self._as_user([str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                               "-c", "listen_addresses=127.0.0.1",
                               "-c", f"unix_socket_directories={self.root}",
                               "-c", "log_connections=on", "-c", "log_disconnections=on",
                               "-c", "log_min_messages=debug1", "-c", "fsync=off"]),
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()}")

    def stop(self, *, fast: bool = False) -> None:
        """Smart shutdown (waits for clients to leave), or fast: ends every session at once (an outage)."""
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
