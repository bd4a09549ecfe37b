"""stopright/listener.py on real sockets: queued connections served, new ones refused.

The worker classes themselves are exercised end to end (tests/e2e/test_load_stop.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from stopright import listener as web_worker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux socket filter, /proc")


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def gone_pid() -> int:
    """The pid of a process that has exited (it holds nothing)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_holds_tells_whether_a_process_still_has_the_socket_open(listener) -> None:
    assert web_worker.holds(os.getpid(), listener)
    assert not web_worker.holds(gone_pid(), listener)


def test_hand_over_serves_what_is_queued_then_refuses_new_connections(listener) -> None:
    port = listener.getsockname()[1]
    queued = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # completed by the kernel
    served = []

    def serve(_listener, client, _addr):
        served.append(client)

    web_worker.hand_over(listener, gone_pid(), serve)

    assert len(served) == 3
    for client, conn in zip(queued, served, strict=False):  # every queued one really was accepted
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
    assert listener.fileno() == -1  # closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    for s in queued + served:
        s.close()


def test_hand_over_waits_for_the_master_and_serves_what_arrives_meanwhile(listener) -> None:
    port = listener.getsockname()[1]
    # A "master" that still holds the socket for half a second: a child that inherited it.
    master = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"],
                              pass_fds=(listener.fileno(),))
    clients: list[socket.socket] = []
    late = threading.Timer(0.1, lambda: clients.append(socket.create_connection(("127.0.0.1", port))))
    served = []
    try:
        late.start()
        web_worker.hand_over(listener, master.pid, lambda _l, c, _a: served.append(c))
        master_gone_first = master.poll() is not None
    finally:
        late.join()
        master.wait()
    assert master_gone_first  # it waited for the master's copy to be closed
    assert len(served) == 1  # and served the connection that came meanwhile
    for s in clients + served:
        s.close()


def test_a_refusing_socket_ignores_new_handshakes_but_completes_queued_ones(listener) -> None:
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))
    assert web_worker._refuse_handshakes(listener)
    with pytest.raises(TimeoutError):  # the SYN is dropped: no answer, neither accepted nor reset
        socket.create_connection(("127.0.0.1", port), timeout=0.3)
    conn, _ = listener.accept()
    queued.sendall(b"still fine")
    assert conn.recv(10) == b"still fine"
    conn.close()
    queued.close()
