"""stopright/listener.py on real sockets: queued connections served, new ones refused.

On every bind (TCP over IPv4 and IPv6, Unix sockets), never on a socket another
server holds. The worker classes themselves are exercised end to end
(tests/e2e/test_load_stop.py, tests/e2e/test_binds.py).
"""

from __future__ import annotations

import ctypes
import os
import resource
import socket
import struct
import subprocess
import sys
import threading

import pytest

from stopright import listener as web_worker
from tests.servers import missing

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
    assert web_worker.refuse_handshakes(listener)
    with pytest.raises(TimeoutError):  # the SYN is dropped: no answer, neither accepted nor reset
        socket.create_connection(("127.0.0.1", port), timeout=0.3)
    conn, _ = listener.accept()
    queued.sendall(b"still fine")
    assert conn.recv(10) == b"still fine"
    conn.close()
    queued.close()


def notes(*, shared: bool = False, refusing: bool = False) -> web_worker.MasterNotes:
    """What a master tells its workers once its stop began and its listeners are closed."""
    told = web_worker.MasterNotes()
    told.note_sharing(shared, refusing)
    told.note_closed()
    return told


def test_a_unix_socket_is_handed_over_too_new_clients_refused_at_once(tmp_path) -> None:
    path = str(tmp_path / "web.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    queued = []
    for _ in range(2):
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)  # completes into the accept queue at once: no handshake in progress
        queued.append(client)
    served, late = [], []

    def serve(_listener, conn, _addr):
        served.append(conn)
        client = socket.socket(socket.AF_UNIX)  # each arrival brings another, while the queue is served
        try:
            client.connect(path)
            queued.append(client)
            late.append("queued")
        except ConnectionRefusedError:
            client.close()
            late.append("refused")

    web_worker.hand_over(listener, gone_pid(), serve, notes())

    assert len(served) == len(queued)  # every connection queued was served: none left to a reset
    assert late[-1] == "refused", late  # once the whole server stops, new ones are refused at once
    queued[0].sendall(b"ping")
    assert served[0].recv(4) == b"ping"
    assert listener.fileno() == -1
    for s in queued + served:
        s.close()


def test_ipv6_handed_over_and_refused() -> None:
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", 0))
    v6.listen(16)
    port = v6.getsockname()[1]
    queued = socket.create_connection(("::1", port))
    served = []
    told = notes(refusing=web_worker.refuse_handshakes(v6))  # the master's, at its stop
    web_worker.hand_over(v6, gone_pid(), lambda _l, c, _a: served.append(c), told)
    assert len(served) == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("::1", port), timeout=5)
    for s in (queued, *served):
        s.close()


def _drop_final_acks(sock: socket.socket) -> None:
    """A filter that drops the ACK completing a handshake: the connection stays in SYN_RECV."""
    prog = (ctypes.c_uint64 * 5)(*(code | jt << 16 | jf << 24 | k << 32 for code, jt, jf, k in [
        (0x30, 0, 0, 13), (0x45, 2, 0, 0x02), (0x45, 0, 1, 0x10), (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]))
    sock.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HL", 5, ctypes.addressof(prog)))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_handshake_in_progress_is_seen_on_both_families(host: str) -> None:
    server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    server.bind((host, 0))
    server.listen(16)
    port = server.getsockname()[1]
    try:
        _drop_final_acks(server)
    except PermissionError:
        pytest.skip("this kernel lets no unprivileged process attach a socket filter")
    client = socket.create_connection((host, port), timeout=5)  # the client is done; the server is not
    try:
        assert web_worker._handshakes_in_progress(port)
        assert web_worker.detach_filter(server.fileno())
        client.sendall(b"x")  # carries the ACK again: the handshake completes
        conn, _ = server.accept()
        assert not web_worker._handshakes_in_progress(port)
        conn.close()
    finally:
        client.close()
        server.close()


def test_a_listener_past_fd_1024_is_handed_over(listener) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    high = socket.socket(fileno=os.dup2(listener.fileno(), 1500))  # select() takes none past 1023
    port = high.getsockname()[1]
    master = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"],
                              pass_fds=(high.fileno(),))
    try:
        queued = socket.create_connection(("127.0.0.1", port))
        served = []
        web_worker.hand_over(high, master.pid, lambda _l, c, _a: served.append(c))  # waits on the listener
    finally:
        master.wait()
    assert len(served) == 1
    for s in (queued, *served):
        s.close()


def test_nothing_is_refused_on_a_socket_another_server_holds(listener) -> None:
    port = listener.getsockname()[1]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=(listener.fileno(),))
    try:
        web_worker.hand_over(listener, gone_pid(), lambda *a: None, notes(shared=True))
        # The other server's copy is as it was: a new client's handshake completes.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        other.kill()
        other.wait()


SLEEPER = "import time; time.sleep(60)"
# A child that starts a sleeper holding file descriptor argv[1], prints its pid and waits for it:
# the sleeper is another process's child, not ours. (An orphan would not do: in a pytest process
# that an earlier test made a child subreaper, stopcheck's, it would come back to us.)
SPAWNER = ("import subprocess, sys; fd = int(sys.argv[1]); "
           f"p = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], pass_fds=(fd,)); "
           "print(p.pid, flush=True); p.wait()")


def test_held_elsewhere_tells_this_servers_processes_from_others(listener) -> None:
    fd = listener.fileno()
    ours = subprocess.Popen([sys.executable, "-c", SLEEPER], pass_fds=(fd,))
    theirs = 0
    spawner = None
    try:
        assert web_worker.held_elsewhere([listener], os.getpid()) is not True  # a child: one of ours
        spawner = subprocess.Popen([sys.executable, "-c", SPAWNER, str(fd)], pass_fds=(fd,),
                                   stdout=subprocess.PIPE, text=True)
        theirs = int(spawner.stdout.readline())  # its child holds the socket: another server's
        assert web_worker.held_elsewhere([listener], os.getpid()) is True
    finally:
        ours.kill()
        ours.wait()
        if theirs:
            os.kill(theirs, 9)
        if spawner is not None:
            spawner.wait(10)
            spawner.stdout.close()


def test_an_inherited_filter_is_detached(listener) -> None:
    port = listener.getsockname()[1]
    assert web_worker.refuse_handshakes(listener)
    assert web_worker.detach_filter(listener.fileno())
    assert not web_worker.detach_filter(listener.fileno())  # none left
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket(socket.AF_UNIX) as unix:
        assert not web_worker.refuse_handshakes(unix)  # TCP only


def test_a_worker_of_another_user_asks_the_masters_notes(listener) -> None:
    if os.geteuid() != 0:
        missing("switching a process to nobody needs root", "REQUIRE_ROOT")
    told = web_worker.MasterNotes()  # shared with the forked child
    checked, closed = os.pipe(), os.pipe()
    child = os.fork()
    if child == 0:  # as a worker under gunicorn's user=: /proc/<master>/fd is unreadable
        os.setgid(65534)
        os.setuid(65534)
        unreadable = not os.access(f"/proc/{os.getppid()}/fd", os.R_OK)
        before = web_worker.holds(os.getppid(), listener, told)
        os.write(checked[1], b"!")
        os.read(closed[0], 1)
        after = web_worker.holds(os.getppid(), listener, told)
        os._exit(100 * unreadable + 10 * before + (not after))
    try:
        os.read(checked[0], 1)
        told.note_closed()  # the master closed its listeners
        os.write(closed[1], b"!")
    finally:
        _, status = os.waitpid(child, 0)
        for fd in (*checked, *closed):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 111  # unreadable; held until the master said closed
