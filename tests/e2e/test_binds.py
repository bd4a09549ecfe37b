"""The stop on every bind users run gunicorn on (issue 14, point 1 and the gunicorn items of its list).

TCP over IPv4 and IPv6, a Unix socket (nginx in front), a socket inherited
by the next master of gunicorn's zero-downtime upgrade (``USR2``, then TERM
to the old master), a socket from systemd's socket activation (``LISTEN_FDS``),
and workers that run as another user (``user=``). On each, clients keep
coming through the stop, and every request is answered or refused: none
reset, none left hanging (a SYN dropped by a socket filter nobody detached),
no 5xx; no worker crashes or is SIGKILLed, each runs ``worker_exit`` (its
"closing app resources" line) and the master exits 0.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.bindserver import Gunicorn, Slow, Stream, Target, listener_inode, report, request, running
from tests.procset import free_port
from tests.servers import missing

NEVER = ("reset", "hung")
SLOW = 3.5  # longer than gunicorn's quick stop (2 s, then SIGKILL) that a queued SIGINT turned it into
GRACE = "10"  # the master's graceful_timeout: the slow request fits in it


def holds(pid: int, inode: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    target = f"socket:[{inode}]"
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def wait_served(target: Target, server: Gunicorn, timeout: float = 60) -> None:
    server.wait_for(r"Booting worker with pid", count=2)
    deadline = time.monotonic() + timeout
    while (outcome := request(target, timeout=5)[0]) != "answered":
        assert time.monotonic() < deadline, f"not served ({outcome}):\n{server.output}"
        time.sleep(0.05)


def assert_clean(server: Gunicorn, workers: list[int], counts: Counter[str], rc: int | None,
                 left: list[int]) -> None:
    """The stop's guarantees; ``left``: the processes of the stopped server still running after it."""
    out = server.output
    if rc is not None:
        assert rc == 0, out
    assert "Traceback" not in out, out
    assert "exited with code" not in out, out  # gunicorn logs a worker's non-zero exit
    assert "was sent SIGKILL" not in out, out
    for pid in workers:  # worker_exit ran in each
        assert re.search(rf"\[{pid}\] \[INFO\] closed app resources in \d+ ms", out), (pid, out)
    bad = {k: n for k, n in counts.items() if k in NEVER or k[0].isdigit() or k.startswith("oserror")}
    assert not bad, (counts, out[-3000:])
    assert not left, left


def sigkills(server: Gunicorn, workers: list[int]) -> int:
    """Workers ended without running worker_exit: the master SIGKILLs them (and may not log it)."""
    out = server.output
    return sum(not re.search(rf"\[{pid}\] \[INFO\] shutdown complete in", out) for pid in workers)


def target_for(kind: str, tmp_path: Path) -> Target:
    if kind == "unix":
        return Target(str(tmp_path / "web.sock"))
    return Target({"tcp4": "127.0.0.1", "tcp6": "::1"}[kind], free_port())


@pytest.mark.parametrize(("kind", "worker"), [("tcp4", "ThreadWorker"), ("tcp6", "SyncWorker"),
                                              ("unix", "ThreadWorker")])
def test_a_stop_on_each_bind_answers_or_refuses_every_request(tmp_path: Path, kind: str, worker: str) -> None:
    target = target_for(kind, tmp_path)
    threads = "1" if worker == "SyncWorker" else "4"  # a *SyncWorker with threads: gunicorn runs its gthread
    server = Gunicorn(tmp_path, ["--bind", target.bind, "--threads", threads, "--graceful-timeout", GRACE,
                                 "--worker-class", f"stopright.upstream.gunicorn.{worker}"])
    try:
        server.start()
        wait_served(target, server)
        master = server.proc.pid
        workers = server.workers()
        # The app's own SIGALRM handler (bindconf.py) is left in place: stopright takes no SIGALRM.
        for pid in (master, *workers):
            os.kill(pid, signal.SIGALRM)
            server.wait_for(rf"app alarm in {pid}\b")
        stream = Stream(target).start()
        stream.wait_answers(20)
        assert server.proc.poll() is None and not re.search(r"Worker exiting", server.output), server.output
        slow = Slow(target, SLOW)
        slow.start()
        server.wait_for(r"slow request in \d+")
        inode = listener_inode(master)

        signalled = time.monotonic()
        os.killpg(master, signal.SIGTERM)  # as honcho and systemd: the master and its workers
        # The master's stop has begun (its listener closed): a second Ctrl+C, then supervisord's
        # SIGQUIT. gunicorn would turn either into its quick stop (SIGKILL 2 s later).
        wait_until(lambda: not holds(master, inode), f"the master kept its listener:\n{server.output}")
        os.killpg(master, signal.SIGINT)
        os.killpg(master, signal.SIGQUIT)
        rc = server.proc.wait(60)
        stop_seconds = time.monotonic() - signalled
        slow.join(60)
        counts = stream.finish()
        left = [p.pid for p in server.survivors()]
    finally:
        server.cleanup()

    report(f"{kind} {worker.lower()}", counts, stop_seconds, sigkills(server, workers), stream.longest_wait())
    assert slow.outcome == "answered", (slow.outcome, server.output)
    assert counts["answered"] >= 20, counts
    assert_clean(server, workers, counts, rc, left)
    if kind == "unix":
        assert not Path(target.host).exists()  # gunicorn removed its socket file


@pytest.mark.parametrize("kind", ["tcp4", "unix"])
def test_usr2_upgrade_then_term_to_the_old_master_keeps_serving(tmp_path: Path, kind: str) -> None:
    # gunicorn's documented zero-downtime upgrade: USR2 starts a new master on the same socket,
    # then TERM stops the old one. Its workers must leave that socket as it was.
    target = target_for(kind, tmp_path)
    server = Gunicorn(tmp_path, ["--bind", target.bind])
    try:
        server.start()
        wait_served(target, server)
        old = server.proc.pid
        old_workers = server.workers()
        stream = Stream(target).start()
        stream.wait_answers(10)

        os.kill(old, signal.SIGUSR2)
        server.wait_for(r"Listening at: ", count=2)
        new = server.masters()[1]
        server.wait_for(rf"\[{new}\] \[INFO\] Starting gunicorn")
        wait_until(lambda: len(server.workers(new)) >= 2, f"the new master's workers:\n{server.output}")
        signalled = time.monotonic()
        os.kill(old, signal.SIGTERM)
        rc_old = server.proc.wait(60)
        stop_seconds = time.monotonic() - signalled
        old_sigkills = sigkills(server, old_workers)

        after = time.monotonic()
        stream.wait_answers(30, since=after, timeout=30)  # served on by the new master's workers
        new_workers = server.workers(new)
        assert set(stream.answered_since(after)) <= set(new_workers), server.output
        server.wait_for(rf"\[{new}\] \[INFO\] Master has been promoted")
        assert not re.search(rf"\[{new}\] \[INFO\] Handling signal: term", server.output), server.output

        os.killpg(old, signal.SIGTERM)  # the same group: the new master and its workers
        server.wait_exit(new)
        counts = stream.finish()
        left = [p.pid for p in server.survivors()]
    finally:
        server.cleanup()

    report(f"usr2 {kind} (stop: the old master)", counts, stop_seconds, old_sigkills, stream.longest_wait())
    assert rc_old == 0, server.output
    assert_clean(server, old_workers + new_workers, counts, None, left)
    assert re.search(rf"\[{new}\] \[INFO\] shutdown complete in \d+ ms", server.output), server.output


LAUNCHER = '''
"""A socket unit, as systemd runs one: bind, keep the socket, start the service with it (LISTEN_FDS).

The socket carries the filter a stopping server of an older stopright left on
it: every new handshake (SYN without ACK) dropped. The service is started
again once the file "restart" exists.
"""
import ctypes, os, socket, struct, sys, time

port, restart, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen(64)
drop_syn = (ctypes.c_uint64 * 5)(*(code | jt << 16 | jf << 24 | k << 32 for code, jt, jf, k in [
    (0x30, 0, 0, 13), (0x45, 0, 2, 0x02), (0x45, 1, 0, 0x10), (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]))
sock.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HL", 5, ctypes.addressof(drop_syn)))  # SO_ATTACH_FILTER


def service():
    pid = os.fork()
    if pid == 0:
        os.dup2(sock.fileno(), 3)
        os.set_inheritable(3, True)  # dup2 onto itself keeps the socket's close-on-exec
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
        os.execvp(command[0], command)
    _, status = os.waitpid(pid, 0)
    print(f"service {pid} exited: {os.waitstatus_to_exitcode(status)}", flush=True)


service()
while not os.path.exists(restart):
    time.sleep(0.02)
service()
'''


def test_socket_activation_serves_and_leaves_the_socket_clean_for_the_next_start(tmp_path: Path) -> None:
    (tmp_path / "socket_unit.py").write_text(LAUNCHER)
    target = Target("127.0.0.1", free_port())
    restart = tmp_path / "restart"
    launcher = [sys.executable, "socket_unit.py", str(target.port), str(restart)]
    server = Gunicorn(tmp_path, [], launcher=launcher)
    try:
        server.start()
        wait_served(target, server)  # the filter left on the socket was detached
        master = server.masters()[0]
        workers = server.workers()
        stream = Stream(target).start()
        stream.wait_answers(20)
        signalled = time.monotonic()
        for pid in (master, *workers):  # systemd's control group, the socket unit (pid 1) spared
            os.kill(pid, signal.SIGTERM)
        server.wait_for(r"service \d+ exited: 0")
        stop_seconds = time.monotonic() - signalled
        left = [pid for pid in (master, *workers) if running(pid)]
        # The socket lives on in its unit, the clients' connections wait in its queue; a new
        # client's handshake completes (no filter left on it)...
        waiting = socket.create_connection(("127.0.0.1", target.port), timeout=5)
        waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        restart.touch()  # ...and the next start answers them all.
        waiting.settimeout(60)
        answer = waiting.recv(1024)
        waiting.close()
        server.wait_for(r"Booting worker with pid", count=4)
        stream.wait_answers(20, since=time.monotonic())
        counts = stream.finish()
    finally:
        server.cleanup()

    report("systemd LISTEN_FDS", counts, stop_seconds, sigkills(server, workers), stream.longest_wait())
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert re.search(r"the listening socket inherited as fd \d+ dropped new connections", server.output)
    assert counts["answered"] >= 20, counts
    assert_clean(server, workers, counts, None, left)


@pytest.fixture
def readable_dir():
    """A directory ``nobody`` can read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="stopright-binds-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_workers_of_another_user_keep_the_socket_working_and_drain(readable_dir: Path) -> None:
    # gunicorn's user=/group=: the workers cannot read /proc/<master>/fd.
    if os.geteuid() != 0:
        missing("user= needs root (the workers switch to nobody)", "REQUIRE_ROOT")
    tmp_path = readable_dir
    target = Target("127.0.0.1", free_port())
    common = ["--bind", target.bind, "--user", "nobody", "--group", "nogroup"]

    # A worker recycled (max_requests) while the master serves on leaves the socket as it was.
    server = Gunicorn(tmp_path / "recycle", [*common, "--max-requests", "40", "--max-requests-jitter", "0"])
    try:
        server.start()
        wait_served(target, server)
        stream = Stream(target).start()
        server.wait_for(r"Autorestarting worker", count=2)
        after = time.monotonic()
        stream.wait_answers(30, since=after, timeout=30)
        signalled = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)
        rc = server.proc.wait(60)
        stop_seconds = time.monotonic() - signalled
        counts = stream.finish()
        left = [p.pid for p in server.survivors()]
    finally:
        server.cleanup()
    report("user=nobody, recycled workers", counts, stop_seconds, sigkills(server, server.workers()),
           stream.longest_wait())
    assert_clean(server, server.workers(), counts, rc, left)

    # With a drain, the workers serve on for it (they cannot see the master's listener).
    drain = 1.0
    server = Gunicorn(tmp_path / "drain", common, env={"SHUTDOWN_DRAIN_SECONDS": str(drain)})
    try:
        server.start()
        wait_served(target, server)
        workers = server.workers()
        stream = Stream(target).start()
        stream.wait_answers(20)
        signalled = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)
        exited: dict[int, float] = {}
        deadline = signalled + 60
        while len(exited) < len(workers) and time.monotonic() < deadline:
            for pid in workers:
                if pid not in exited and not running(pid):
                    exited[pid] = time.monotonic() - signalled
            time.sleep(0.01)
        rc = server.proc.wait(60)
        stop_seconds = time.monotonic() - signalled
        counts = stream.finish()
        left = [p.pid for p in server.survivors()]
    finally:
        server.cleanup()
    report("user=nobody, drain", counts, stop_seconds, sigkills(server, workers), stream.longest_wait())
    assert len(exited) == len(workers) and min(exited.values()) >= drain, (exited, server.output)  # drained
    assert_clean(server, workers, counts, rc, left)
