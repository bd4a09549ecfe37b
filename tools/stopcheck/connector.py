"""The Linux proc connector: every fork, exec and exit on the machine, with exit statuses and kernel times.

Netlink (``NETLINK_CONNECTOR``); before Linux 6.6 listening needs root
(CAP_NET_ADMIN). :class:`ProcConnector` feeds a tools.stopcheck.proctrack
:class:`~tools.stopcheck.proctrack.Tracker` from its own thread; without it, exit
times come from polling /proc.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
import time

from tools.stopcheck.proctrack import Tracker

# Linux proc connector (include/uapi/linux/cn_proc.h, connector.h).
NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_NONE = 0x0  # the kernel's answer to LISTEN: err 0, or EPERM where listening needs root
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_EXIT = 0x80000000
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG_HDR = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
EVENT_HDR = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33
#: Once told to stop, how long the thread still reads what the socket holds (events already sent).
DRAIN_SECONDS = 1.0
#: An event's kernel time at most this far behind its reading is this clock's (a busy machine lags).
LAG_SECONDS = 30.0


def parse_proc_events(data: bytes) -> list[tuple[int, int, tuple[int, ...]]]:
    """Proc connector events in one netlink datagram: (what, timestamp_ns, fields).

    fields: NONE (err,), the answer to LISTEN; FORK (parent_pid, parent_tgid, child_pid, child_tgid);
    EXEC (pid, tgid);
    EXIT (pid, tgid, exit_code as a wait status, exit_signal). Other events are skipped.
    """
    events = []
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, _type, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            break  # malformed or truncated
        body = offset + NLMSG_HDR.size
        if body + CN_MSG_HDR.size + EVENT_HDR.size <= offset + length:
            idx, val, _s, _a, _len, _f = CN_MSG_HDR.unpack_from(data, body)
            if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC):
                ev = body + CN_MSG_HDR.size
                what, _cpu, ts = EVENT_HDR.unpack_from(data, ev)
                payload = ev + EVENT_HDR.size
                if what == PROC_EVENT_NONE and payload + 4 <= offset + length:
                    events.append((what, ts, struct.unpack_from("=I", data, payload)))
                elif what == PROC_EVENT_FORK and payload + 16 <= offset + length:
                    events.append((what, ts, struct.unpack_from("=IIII", data, payload)))
                elif what == PROC_EVENT_EXEC and payload + 8 <= offset + length:
                    events.append((what, ts, struct.unpack_from("=II", data, payload)))
                elif what == PROC_EVENT_EXIT and payload + 16 <= offset + length:
                    events.append((what, ts, struct.unpack_from("=IIII", data, payload)))
        offset += (length + 3) & ~3
    return events


class ProcConnector:
    """Fork, exec and exit events of every process on the machine (root only before Linux 6.6)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
                    break
            self.sock.bind((os.getpid(), CN_IDX_PROC))
            self._control(PROC_CN_MCAST_LISTEN)
            self._wait_ack()
            self.sock.settimeout(0.1)
        except BaseException:
            self.sock.close()
            raise

    def _wait_ack(self) -> None:
        """Before Linux 6.6 an unprivileged LISTEN is answered with EPERM (and no events)."""
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            for what, _ts, fields in parse_proc_events(data):
                if what == PROC_EVENT_NONE:
                    if fields[0]:
                        raise OSError(fields[0], os.strerror(fields[0]))
                    return
        raise OSError(errno.ETIMEDOUT, "no answer to PROC_CN_MCAST_LISTEN")

    def _control(self, op: int) -> None:
        payload = struct.pack("=I", op)
        cn = CN_MSG_HDR.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        self.sock.send(NLMSG_HDR.pack(NLMSG_HDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn)

    def run(self, tracker: Tracker, stop: threading.Event) -> None:
        """Feed ``tracker`` until ``stop``, then what the socket still holds (a busy machine lags)."""
        drain_until = None
        while True:
            if stop.is_set() and drain_until is None:
                drain_until = time.monotonic() + DRAIN_SECONDS
                self.sock.settimeout(0)
            if drain_until is not None and time.monotonic() > drain_until:  # the machine never pauses
                break
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except BlockingIOError:  # drained
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # events dropped: polling covers the gap
                    tracker.connector_lost_events = True
                    continue
                break
            now = time.monotonic()
            for what, ts, fields in parse_proc_events(data):
                t = ts / 1e9
                if not now - LAG_SECONDS <= t <= now + 0.01:  # another clock (time namespace): use receipt
                    t = now
                if what == PROC_EVENT_FORK:
                    _ppid, parent_tgid, child_pid, child_tgid = fields
                    if child_pid == child_tgid:  # a process, not a thread
                        tracker.note_fork(parent_tgid, child_pid, t)
                elif what == PROC_EVENT_EXEC:
                    pid, tgid = fields
                    if pid == tgid:
                        tracker.note_exec(pid, t)
                elif what == PROC_EVENT_EXIT:
                    pid, tgid, status, _exit_signal = fields
                    if pid == tgid:
                        tracker.note_exit(pid, status, t)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._control(PROC_CN_MCAST_IGNORE)
        self.sock.close()


def open_proc_connector() -> tuple[ProcConnector | None, str]:
    try:
        return ProcConnector(), ""
    except PermissionError:
        return None, "no permission for the proc connector (before Linux 6.6 it needs CAP_NET_ADMIN)"
    except OSError as e:
        return None, f"proc connector unavailable ({e.strerror or e})"
