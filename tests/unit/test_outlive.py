"""stopright/outlive.py's pieces: who counts as a client, the exit code, the command line.

The whole program, with a real redis-server under a stop signal: tests/e2e/test_outlive_redis.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from stopright import budget, outlive
from tests.procset import ROOT

#: A stand-in server: listens, accepts and holds every connection, and opens one of its own elsewhere.
SERVER = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
elsewhere = socket.create_server(("127.0.0.1", 0))
outbound = socket.create_connection(elsewhere.getsockname())  # the server as a client of another
inbound = elsewhere.accept()[0]
self_client = socket.create_connection(listener.getsockname())  # the tree connected to itself
print(listener.getsockname()[1], flush=True)
held = [listener.accept()[0]]  # self_client's
while True:
    held.append(listener.accept()[0])
"""


@pytest.fixture
def server() -> Iterator[tuple[psutil.Process, int]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield psutil.Process(proc.pid), port
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_only_connections_from_outside_to_a_listening_port_are_clients(server) -> None:
    process, port = server
    assert outlive.client_connections(process) == 0  # its own outbound and self-connections are not
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        wait_for(lambda: outlive.client_connections(process) == 2)
        clients.pop().close()
        # The server has not closed its side (it never reads): CLOSE_WAIT is a client gone.
        wait_for(lambda: outlive.client_connections(process) == 1)
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: outlive.client_connections(process) == 0)


def test_the_server_tree_counts_and_a_gone_server_has_no_clients() -> None:
    # A parent that only waits, the listener in its child (PostgreSQL's backends hold the clients).
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {SERVER!r}])"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        parent = psutil.Process(proc.pid)
        with socket.create_connection(("127.0.0.1", port)):
            wait_for(lambda: outlive.client_connections(parent) == 1)
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    assert outlive.client_connections(parent) == 0


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


#: A stand-in server on a Unix socket: reads each client and closes its end on EOF (as Redis does);
#: also a client of another server, with a socketpair of its own; "fork" makes a child holding every fd.
UNIX_SERVER = """
import os, selectors, socket, sys, time
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen()
outbound = socket.socket(socket.AF_UNIX)
outbound.connect(sys.argv[2])  # the server as a client of another
pair = socket.socketpair()  # its own plumbing
print("up", flush=True)
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        if key.fileobj is listener:
            selector.register(listener.accept()[0], selectors.EVENT_READ)
            continue
        data = key.fileobj.recv(1024)
        if data == b"fork" and os.fork() == 0:  # Redis's BGSAVE: the child shares every socket
            time.sleep(60)
        if not data:
            selector.unregister(key.fileobj)
            key.fileobj.close()
"""


def test_unix_socket_clients_count_not_the_listener_nor_the_servers_own(tmp_path) -> None:
    elsewhere = socket.socket(socket.AF_UNIX)
    elsewhere.bind(str(tmp_path / "elsewhere.sock"))
    elsewhere.listen()
    path = str(tmp_path / "server.sock")
    proc = subprocess.Popen([sys.executable, "-c", UNIX_SERVER, path, str(tmp_path / "elsewhere.sock")],
                            stdout=subprocess.PIPE, text=True)
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        server = psutil.Process(proc.pid)
        assert outlive.client_connections(server) == 0  # its listener, outbound and socketpair are not
        for _ in range(2):
            clients.append(socket.socket(socket.AF_UNIX))
            clients[-1].connect(path)
        wait_for(lambda: outlive.client_connections(server) == 2)
        clients[0].sendall(b"fork")
        wait_for(lambda: len(server.children()) == 1)
        assert outlive.client_connections(server) == 2  # shared with the fork: once each
        # A client gone while a fork still holds the server's end (a BGSAVE): counted until the fork exits.
        held = len(server.net_connections(kind="unix"))
        clients.pop().close()
        wait_for(lambda: len(server.net_connections(kind="unix")) == held - 1)  # the server closed its end
        assert outlive.client_connections(server) == 2
        server.children()[0].kill()
        wait_for(lambda: outlive.client_connections(server) == 1)
    finally:
        for client in clients:
            client.close()
        for child in psutil.Process(proc.pid).children():
            child.kill()
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        elsewhere.close()


@pytest.mark.parametrize(("returncode", "code"), [(0, 0), (3, 3), (-15, 143), (-9, 137), (None, 1)])
def test_exit_code_follows_the_shell_convention(returncode: int | None, code: int) -> None:
    assert outlive.exit_code(returncode) == code


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        outlive.main(["--"])
    assert exited.value.code == 2
    assert "no server command" in capsys.readouterr().err


def test_a_server_that_ends_on_its_own_ends_the_entry_with_its_code() -> None:
    # No stop signal: the manager must see the server's end (honcho then stops the set).
    done = subprocess.run([sys.executable, "-m", "stopright.outlive", "--", sys.executable, "-c",
                           "raise SystemExit(7)"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, done.stderr
    assert "exited with 7" in done.stderr
    assert "graceful shutdown started" not in done.stderr


@pytest.mark.parametrize(("environ", "command", "seconds"), [
    ({}, "", 5.0),  # no known manager: the worker's whole stop (grace 3 + 2)
    ({"HONCHO_PROCESS_NAME": "redis.1"}, "honcho start", 4.0),  # honcho's SIGKILL at 5 s: 1 s for Redis
    ({"DYNO": "web.1"}, "", 5.0),  # Heroku's 30 s hold the worker's whole stop
])
def test_the_wait_for_clients_fits_the_managers_sigkill(environ: dict[str, str], command: str,
                                                       seconds: float) -> None:
    assert outlive.linger_seconds(budget.fit(3.0, 0.0, environ, command)) == seconds
