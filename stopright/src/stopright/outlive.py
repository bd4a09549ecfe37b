"""Run a server that must outlive its clients at a stop: ``python -m stopright.outlive -- redis-server ...``.

The hazard: a broker in the same Procfile as its clients gets the stop with
everybody else (honcho: ``killpg(SIGTERM)`` to every entry; systemd, Heroku,
Kubernetes: the whole tree) and exits at once, while the Celery worker still
needs it to hand its running tasks back: on Redis such a task's message then
waits out kombu's visibility timeout (1 h) before any worker gets it.

So the server runs as our child in a session of its own, out of reach of
the entry's group signal (and a terminal's Ctrl+C). On the first stop signal
(repeats change nothing: under honcho the ``sh -c`` wrapper's death sends a
second SIGTERM) we wait until the server has no client connection left, over
TCP or its Unix sockets (over its process tree: Redis, RabbitMQ, PostgreSQL
alike) or the stop budget is spent (:func:`linger_seconds`), then SIGTERM it, wait for it
(bounded) and exit with its code. SIGKILLed, we leave no orphan: the kernel
SIGTERMs the server (``PR_SET_PDEATHSIG``); the manager's death is a stop
signal (``stop_with_parent``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from stopright import budget, registry, signals

if TYPE_CHECKING:  # psutil is imported at the stop: at rest the watcher stays a small process
    import psutil

log = logging.getLogger("stopright")

#: After its SIGTERM, how long the server has to exit (Redis saves first) before we leave without it.
STOP_WAIT_SECONDS = 5.0
#: Under a manager whose SIGKILL is certain (honcho: 5 s), what the lingering leaves for the server's stop.
SERVER_STOP_MARGIN = 1.0
POLL_SECONDS = 0.05
FORMAT = "%(asctime)s.%(msecs)03d outlive[%(process)d] %(levelname)s %(name)s: %(message)s"


def client_connections(server: psutil.Process) -> int:
    """Client connections to the server's process tree: over TCP and over its Unix sockets.

    The tree: PostgreSQL holds each client in a backend child. A connection
    shared with a fork (Redis's BGSAVE) counts once; a client's close ends
    it at once (TCP: CLOSE_WAIT; a Unix socket: once the server closes its
    end, which Redis and PostgreSQL do as soon as they read the end).
    """
    import psutil

    try:
        tree = [server, *server.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    return _tcp_clients(tree) + _unix_clients(tree)


def _tcp_clients(tree: list[psutil.Process]) -> int:
    """Established connections to a port the tree listens on, not from the tree itself."""
    import psutil

    connections = set()
    for process in tree:
        try:
            connections.update(process.net_connections(kind="tcp"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    listening = {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    own = {tuple(c.laddr) for c in connections}
    clients = {(tuple(c.laddr), tuple(c.raddr)) for c in connections
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port in listening
               and c.raddr and tuple(c.raddr) not in own}
    return len(clients)


#: /proc/net/unix: ``Flags`` of a listening socket (__SO_ACCEPTCON); ``St`` of a connected one (SS_CONNECTED).
_ACCEPTCON = 0x10000
_CONNECTED = 3


def _unix_clients(tree: list[psutil.Process]) -> int:
    """Accepted connections on a Unix socket path the tree listens on (``redis-server --unixsocket``).

    psutil shows the listening socket and each accepted one alike (the
    socket's path, no state), so ``/proc/net/unix`` tells them apart, by the
    inodes the tree holds: a listener has __SO_ACCEPTCON; the server's end
    of a client's connection is connected and named by the listener's path.
    The server's own connections elsewhere (syslog, another server) and its
    socketpairs have no path of its own and are not counted. Linux only
    (elsewhere 0). The file names no peer and no shutdown: a connection the
    tree opened to itself over its socket counts, and so does a client gone
    while a fork still holds the server's end (a Redis BGSAVE) until the fork
    exits; the linger's budget bounds both.
    """
    held = set()
    for process in tree:
        try:
            fds = os.listdir(f"/proc/{process.pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                held.add(int(target[8:-1]))
    if not held:
        return 0
    try:
        with open("/proc/net/unix") as f:
            table = f.read().splitlines()[1:]
    except OSError:
        return 0
    listened, connected = set(), set()
    for line in table:
        fields = line.split(maxsplit=7)  # Num RefCount Protocol Flags Type St Inode [Path]
        if len(fields) < 8 or int(fields[6]) not in held:
            continue
        if int(fields[3], 16) & _ACCEPTCON:
            listened.add(fields[7])
        elif int(fields[5], 16) == _CONNECTED:
            connected.add((int(fields[6]), fields[7]))
    return sum(1 for _inode, path in connected if path in listened)


def linger_seconds(stop_budget: budget.StopBudget) -> float:
    """The slowest client's stop (a worker's grace + hand-back), within a certain SIGKILL less 1 s."""
    seconds = stop_budget.stop_timeout
    manager = stop_budget.manager
    if manager is not None and manager.enforce:
        seconds = min(seconds, manager.kill_after - SERVER_STOP_MARGIN)
    return seconds


def linger(child: subprocess.Popen[bytes], seconds: float) -> int:
    """Wait until no client is connected (or the server is gone) or ``seconds`` are spent; what remains."""
    import psutil

    deadline = time.monotonic() + seconds
    if child.poll() is not None:
        return 0
    server = psutil.Process(child.pid)  # not reaped yet, so the pid is still the child's
    remaining = waited = client_connections(server)
    if waited:
        log.info("waiting up to %.1f s for %d client connection(s) to close", seconds, remaining)
    while remaining and time.monotonic() < deadline and child.poll() is None:
        time.sleep(POLL_SECONDS)
        remaining = client_connections(server)
    if remaining:
        log.warning("%d client connection(s) still open after %.1f s: stopping the server anyway",
                    remaining, seconds)
    elif waited:
        log.info("every client connection closed")
    return remaining


def exit_code(returncode: int | None) -> int:
    """The shell's convention: 128 + N for a death by signal N; 1 for a server still running."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stopright.outlive", description=__doc__.splitlines()[0])
    parser.add_argument("--linger", type=float, help="seconds to wait for clients (default: the stop budget)")
    parser.add_argument("--stop-wait", type=float, default=STOP_WAIT_SECONDS,
                        help="seconds the server has to exit after its SIGTERM")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the server's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no server command (python -m stopright.outlive -- redis-server ...)")
    logging.basicConfig(level=logging.INFO, format=FORMAT, datefmt="%H:%M:%S")

    reg = registry.current()
    wakeup = signals.Wakeup()

    def on_signal(signum: int, _frame: object) -> None:  # signal context: record, wake the loop
        reg.record_signal(signum)
        wakeup.set()

    for signum in signals.STOP_SIGNALS:
        signal.signal(signum, on_signal)
    stop_budget = budget.announce()
    wait_for_clients = linger_seconds(stop_budget) if args.linger is None else args.linger
    name = os.path.basename(command[0])
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=signals.die_with_parent)
    signals.stop_with_parent()
    signals.enable_stack_dumps()
    reg.register(name, lambda: signals.terminate_and_wait(child, args.stop_wait, name),
                 timeout=args.stop_wait + 0.5)
    log.info("%s running as pid %d in a session of its own", name, child.pid)

    while reg.recorded_signal is None and child.poll() is None:
        wakeup.wait(0.2)
    if reg.recorded_signal is None:  # the server ended on its own: the manager should know
        log.error("%s exited with %s", name, child.returncode)
        return exit_code(child.returncode)
    reg.begin()  # "signal received", "graceful shutdown started"
    linger(child, max(0.0, wait_for_clients - reg.elapsed_ms / 1000))
    reg.close_all()
    return exit_code(child.returncode)


if __name__ == "__main__":
    sys.exit(main())
