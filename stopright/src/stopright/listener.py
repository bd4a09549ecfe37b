"""Closing a listening socket without resetting a connection the kernel already accepted.

The hazard (measured: 32 clients posting jobs and long-polling them, ^C):
a stopping gunicorn worker stops calling ``accept()`` but keeps its copy of
the listening socket open until it exits. The kernel goes on completing
handshakes into the shared accept queue, and when the last process closes
the socket, every connection still queued there is reset: every request
that started in the first ~60 ms after ^C was reset (17 POST + 15 GET per
run). :func:`hand_over` serves what is queued until nothing more can come,
then closes: a client turned away is *refused* (it knows nothing was done
and can retry elsewhere), never reset. Plain sockets and /proc: nothing of
gunicorn's here (stopright/upstream/gunicorn.py calls it).

Every bind: TCP over IPv4 or IPv6, and Unix sockets (``AF_UNIX``: a
``connect()`` completes into the accept queue at once, there is no
handshake in progress; a socket filter would see the stream's bytes, not
TCP headers). And sockets shared with another server (the next gunicorn
master after ``USR2``, systemd's socket unit): new connections are refused
only on a socket no one else holds (:class:`MasterNotes`), since what
refuses them is on the socket itself, for every process that has it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

#: How long a stopping worker waits for the master to close its copy of the
#: listening socket (it does so as soon as it handles the stop signal). Only
#: a worker recycled while the master runs on (max_requests) waits it out.
MASTER_CLOSE_WAIT = 1.0

#: After new handshakes are refused, how long at most to wait for those
#: already under way to complete (one round trip: microseconds on loopback,
#: about a millisecond on a LAN) before the socket is closed.
HANDSHAKE_SETTLE = 0.05
_POLL = 0.005


class MasterNotes:
    """What a stopping master tells the workers it forked: two bytes of memory shared across ``fork``.

    Create it in the master before the first fork. ``closed``: the master
    closed its copies of the listening sockets (its stop began); read by a
    worker that cannot see ``/proc/<master>/fd`` (gunicorn's ``user=``: the
    workers run as another user). ``alone``: no process outside this server
    holds the sockets (no next master after an upgrade, no old one, no
    systemd socket unit), so new connections may be refused on them; the
    master also says whether it already refuses TCP handshakes (a socket
    filter may need a privilege the workers dropped). Unknown until the
    master's stop: a worker then refuses nothing.
    """

    _UNKNOWN, _SHARED, _ALONE, _REFUSING = 0, 1, 2, 3

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, 2)  # MAP_SHARED | MAP_ANONYMOUS: each worker sees the master's writes

    @property
    def closed(self) -> bool:
        return self._mem[0] == 1

    def note_closed(self) -> None:
        self._mem[0] = 1

    @property
    def alone(self) -> bool:
        return self._mem[1] in (self._ALONE, self._REFUSING)

    @property
    def refusing(self) -> bool:
        """The master made the TCP listeners drop new handshakes (:func:`refuse_handshakes`)."""
        return self._mem[1] == self._REFUSING

    def note_sharing(self, shared: bool, refusing: bool = False) -> None:
        self._mem[1] = self._SHARED if shared else self._REFUSING if refusing else self._ALONE


def hand_over(
    listener: socket.socket, master: int, serve: Callable[..., None], notes: MasterNotes | None = None
) -> None:
    """Serve what the kernel queues on ``listener`` until nothing more can come; then close ours.

    The last process to close a listening socket resets every connection
    still in its accept queue, and every handshake still in progress. The
    master closes its copy when it handles the stop signal, which on a busy
    machine can come tens of milliseconds after its workers have handled
    theirs (honcho and systemd signal them all at once): a worker that
    closed first would leave the master to reset what arrived meanwhile
    (measured: 1 to 18 resets in some stops). So each worker keeps accepting,
    and serving with ``Connection: close``, until the master's copy is gone
    (at most :data:`MASTER_CLOSE_WAIT`). Then the whole server is stopping;
    on a socket no one else holds (``notes``), new connections are refused
    (a TCP client after its SYN retry, 1 s later; a Unix one at once), the
    handshakes in progress complete, everything queued is served, and only
    then is it closed. On a shared socket nothing is refused: the other
    server's processes keep it, and its queue, open.
    """
    waiting = select.poll()  # not select(): file descriptors >= 1024 (a raised limit, many connections)
    waiting.register(listener.fileno(), select.POLLIN)
    deadline = time.monotonic() + MASTER_CLOSE_WAIT
    while True:
        master_closed = not holds(master, listener, notes)
        _serve_pending(listener, serve)
        if master_closed or time.monotonic() >= deadline:
            break
        waiting.poll(_POLL * 1000)  # a new connection, or time to look again
    if master_closed and notes is not None and notes.alone:
        if listener.family == socket.AF_UNIX:
            _refuse_connections(listener)
        elif notes.refusing or refuse_handshakes(listener):
            port = listener.getsockname()[1]
            settle = time.monotonic() + HANDSHAKE_SETTLE
            while True:
                _serve_pending(listener, serve)
                if time.monotonic() >= settle or not _handshakes_in_progress(port):
                    break
                waiting.poll(_POLL * 1000)
    _serve_pending(listener, serve)
    listener.close()


def _serve_pending(listener: socket.socket, serve: Callable[..., None]) -> None:
    for client, addr in _accept_pending(listener):
        serve(listener, client, addr)


def holds(pid: int, listener: socket.socket, notes: MasterNotes | None = None) -> bool:
    """Whether process ``pid`` (the master) still has ``listener`` open.

    Linux /proc; where it cannot be read (another user's process: gunicorn's
    ``user=``), the master's ``notes``; with neither, assume so (the caller
    then waits :data:`MASTER_CLOSE_WAIT` and refuses nothing).
    """
    fd = listener.fileno()
    try:
        theirs = os.stat(f"/proc/{pid}/fd/{fd}")
    except PermissionError:
        return notes is None or not notes.closed
    except FileNotFoundError:
        if not os.path.isdir("/proc/self/fd"):  # no /proc
            return notes is None or not notes.closed
        return False
    except OSError:
        return False
    ours = os.fstat(fd)
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def held_elsewhere(listeners: Iterable[socket.socket], server: int) -> bool | None:
    """Whether a process outside ``server`` (that pid and its children) has one of ``listeners`` open.

    Linux /proc, every process's open files; None when that cannot be told:
    some process's files are unreadable (another user's, to a user without
    privilege), or no /proc.
    """
    targets = set()
    for listener in listeners:
        try:
            targets.add(os.readlink(f"/proc/self/fd/{listener.fileno()}"))  # "socket:[<inode>]"
        except OSError:
            return None
    unknown = False
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        if pid in (server, os.getpid()):
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            unknown = True
            continue
        except OSError:  # gone meanwhile
            continue
        if any(_link(pid, fd) in targets for fd in fds) and _parent(pid) != server:
            return True
    return None if unknown else False


def _link(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


_SO_ATTACH_FILTER = 26  # Linux, asm-generic/socket.h
_SO_DETACH_FILTER = 27
# A classic BPF socket filter that drops a TCP segment with SYN set and ACK
# clear (a new handshake) and lets every other through (the ACK that
# completes a handshake already under way). The TCP header starts at offset 0.
_DROP_NEW_SYN = (_SockFilter * 5)(
    _SockFilter(0x30, 0, 0, 13),          # ldb [13]: the flags byte
    _SockFilter(0x45, 0, 2, 0x02),        # jset SYN ? next : accept
    _SockFilter(0x45, 1, 0, 0x10),        # jset ACK ? accept : drop
    _SockFilter(0x06, 0, 0, 0),           # ret 0: drop
    _SockFilter(0x06, 0, 0, 0xFFFFFFFF),  # ret all: accept
)


def refuse_handshakes(listener: socket.socket) -> bool:
    """Make a TCP listening socket ignore new connection attempts; False where unsupported.

    Linux's ``SO_ATTACH_FILTER`` (some kernels ask a privilege for it). The
    filter is on the socket itself, so it holds for every process that has
    it open, and stays until detached: attach it only when the whole server
    is stopping and no one else holds the socket (:class:`MasterNotes`).
    Dropped SYNs are retried by the client a second later and then refused,
    since the socket is closed by then.
    """
    if not sys.platform.startswith("linux") or listener.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    prog = struct.pack("HL", len(_DROP_NEW_SYN), ctypes.addressof(_DROP_NEW_SYN))
    try:
        listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog)
    except OSError:
        return False
    return True


def detach_filter(fd: int) -> bool:
    """Detach any socket filter from the socket ``fd``; True if there was one.

    For a socket inherited from a past server, which may have left a filter
    that drops every new connection (:func:`refuse_handshakes`).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        copy = os.dup(fd)
    except OSError:  # no such file descriptor
        return False
    try:
        sock = socket.socket(fileno=copy)
    except OSError:  # no socket
        os.close(copy)
        return False
    with sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError:  # ENOENT: none attached
            return False
    return True


def _refuse_connections(listener: socket.socket) -> None:
    """A Unix listening socket: ``connect()`` is refused from now on; those already queued stay.

    ``shutdown(SHUT_RD)`` on the listening socket (Linux; there is no way
    back, so only on a socket no one else holds). Elsewhere it fails and
    the socket is closed as it is.
    """
    try:
        listener.shutdown(socket.SHUT_RD)
    except OSError:
        pass


def _handshakes_in_progress(port: int) -> bool:
    """Any connection to local ``port`` half-way through its handshake (SYN_RECV), per /proc/net/tcp*."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                for row in rows:
                    fields = row.split()
                    if len(fields) > 3 and fields[3] == "03" and fields[1].endswith(suffix):
                        return True
        except OSError:
            continue
    return False


def _accept_pending(listener: socket.socket) -> list[tuple[socket.socket, Any]]:
    """Every connection already in ``listener``'s accept queue, without waiting."""
    accepted: list[tuple[socket.socket, Any]] = []
    listener.setblocking(False)
    while True:
        try:
            client, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except ConnectionAbortedError:  # reset by its client while queued
            continue
        except OSError:  # the listener is gone
            return accepted
        accepted.append((client, addr))
