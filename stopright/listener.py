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
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable

#: How long a stopping worker waits for the master to close its copy of the
#: listening socket (it does so as soon as it handles the stop signal). Only
#: a worker recycled while the master runs on (max_requests) waits it out.
MASTER_CLOSE_WAIT = 1.0

#: After new handshakes are refused, how long at most to wait for those
#: already under way to complete (one round trip: microseconds on loopback,
#: about a millisecond on a LAN) before the socket is closed.
HANDSHAKE_SETTLE = 0.05
_POLL = 0.005


def hand_over(listener, master: int, serve: Callable[..., None]) -> None:
    """Serve what the kernel queues on ``listener`` until nothing more can come; then close ours.

    The last process to close a listening socket resets every connection
    still in its accept queue, and every handshake still in progress. The
    master closes its copy when it handles the stop signal, which on a busy
    machine can come tens of milliseconds after its workers have handled
    theirs (honcho and systemd signal them all at once): a worker that
    closed first would leave the master to reset what arrived meanwhile
    (measured: 1 to 18 resets in some stops). So each worker keeps accepting,
    and serving with ``Connection: close``, until the master's copy is gone
    (at most :data:`MASTER_CLOSE_WAIT`). Then the whole server is stopping:
    the socket stops taking new handshakes (:func:`_refuse_handshakes`), the
    ones in progress complete, everything queued is served, and only then
    is it closed. A client turned away meanwhile gets its connection
    refused (after its SYN retry, 1 s later), never reset.
    """
    deadline = time.monotonic() + MASTER_CLOSE_WAIT
    while True:
        master_closed = not holds(master, listener)
        for client, addr in _accept_pending(listener):
            serve(listener, client, addr)
        if master_closed or time.monotonic() >= deadline:
            break
        select.select([listener], [], [], _POLL)  # a new connection, or time to look again
    if master_closed and _refuse_handshakes(listener):
        port = listener.getsockname()[1]
        settle = time.monotonic() + HANDSHAKE_SETTLE
        while True:
            for client, addr in _accept_pending(listener):
                serve(listener, client, addr)
            if time.monotonic() >= settle or not _handshakes_in_progress(port):
                break
            select.select([listener], [], [], _POLL)
        for client, addr in _accept_pending(listener):
            serve(listener, client, addr)
    listener.close()


def holds(pid: int, listener) -> bool:
    """Whether process ``pid`` still has ``listener`` open (Linux /proc; elsewhere: assume so)."""
    fd = listener.fileno()
    try:
        theirs = os.stat(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return not os.path.isdir("/proc/self/fd")  # no /proc: wait out MASTER_CLOSE_WAIT
    except OSError:
        return False
    ours = os.fstat(fd)
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


_SO_ATTACH_FILTER = 26  # Linux, asm-generic/socket.h
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


def _refuse_handshakes(listener) -> bool:
    """Make the listening socket ignore new connection attempts; False where unsupported.

    Linux's ``SO_ATTACH_FILTER`` (no privilege needed). The filter is on the
    socket itself, so it holds for every process that has it open; it is
    attached only once the master has closed its copy, when every worker is
    stopping too. Dropped SYNs are retried by the client a second later and
    then refused, since the socket is closed by then.
    """
    if not sys.platform.startswith("linux"):
        return False
    prog = struct.pack("HL", len(_DROP_NEW_SYN), ctypes.addressof(_DROP_NEW_SYN))
    try:
        listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog)
    except OSError:
        return False
    return True


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


def _accept_pending(listener) -> list[tuple[socket.socket, object]]:
    """Every connection already in ``listener``'s accept queue, without waiting."""
    accepted = []
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
