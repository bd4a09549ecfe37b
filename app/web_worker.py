"""gunicorn worker classes whose stop never resets a connection the kernel accepted.

The hazard (measured: 32 clients posting jobs and long-polling them, ^C):
a stopping gunicorn worker stops calling ``accept()`` but keeps its copy of
the listening socket open until it exits. The kernel goes on completing
handshakes into the shared accept queue, and when the last process closes
the socket, every connection still queued there is reset. Clients that got
``Connection: close`` on their last answer reconnect at once and land in
that queue: every request that started in the first ~60 ms after ^C was
reset (17 POST + 15 GET per run). Stock gthread also keeps each kept-alive
connection open for up to 2 s at stop, in case a request is on its way.

What a stopping worker does here, on gunicorn's SIGTERM (or our graceful
SIGINT, gunicorn.conf.py), in its main thread:

1. Every answer that starts after the stop began says ``Connection:
   close`` (long polls in flight answer at once with the job's state), so
   its client will not reuse the connection and cannot be caught by a close.
2. The worker goes on accepting, and serving with ``Connection: close``,
   until the master has closed its copy of the listening socket (it does
   so as soon as it handles the signal); then it accepts what is queued one
   last time and closes its own (:func:`_hand_over`). Once the last copy is
   closed, new connections are *refused* (the client knows nothing was done
   and can retry elsewhere) instead of queued and reset. The only window
   left is the microseconds between the last worker's last ``accept()`` and
   its ``close()``.
3. Kept-alive connections are closed at once (as Go's
   ``http.Server.Shutdown`` and nginx do), unless a request has already
   arrived on one, which is served. A connection answered less than
   :data:`STOP_IDLE_LINGER` ago is kept that long: its client may be sending
   the next request right now, and closing under it would drop that request.

Selected by ``worker_class`` in gunicorn.conf.py. Both classes subclass
gunicorn 27's own workers and override only what is named here.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

from gunicorn.http.errors import ParseException
from gunicorn.workers import gthread, sync

#: How long a connection answered (with keep-alive) just before or during
#: the stop stays open for the client's next request: long enough for a
#: client that reuses its connection at once (well under a millisecond on a
#: LAN), short enough not to hold the stop (stock gthread: 2 s).
STOP_IDLE_LINGER = 0.5

#: How long a stopping worker waits for the master to close its copy of the
#: listening socket (it does so as soon as it handles the stop signal). Only
#: a worker recycled while the master runs on (max_requests) waits it out.
MASTER_CLOSE_WAIT = 1.0

#: After new handshakes are refused, how long at most to wait for those
#: already under way to complete (one round trip: microseconds on loopback,
#: about a millisecond on a LAN) before the socket is closed.
HANDSHAKE_SETTLE = 0.05
_POLL = 0.005


def _hand_over(listener, master: int, serve: Callable[..., None]) -> None:
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
        master_closed = not _holds(master, listener)
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


def _holds(pid: int, listener) -> bool:
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


class _ClosingApp:
    """Both worker classes: graceful on every stop signal, after an optional drain;
    the app wrapped to close connections that must not be reused."""

    alive: bool
    wsgi: Callable[..., object]
    #: Serve on this long after the first stop signal (set by gunicorn.conf.py's ``post_fork``).
    drain_seconds = 0.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._request = threading.local()  # the request this thread is handling
        self._draining = False

    def init_signals(self) -> None:
        """SIGINT and SIGQUIT stop as gracefully as SIGTERM (gunicorn: quick stop, 500s, cut answers).

        A terminal's Ctrl+C, supervisord's and ``honcho export``'s SIGQUIT:
        none of them means "drop the requests in flight". SIGALRM ends a drain.
        """
        super().init_signals()
        for signum in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self.handle_exit)
        signal.signal(signal.SIGALRM, self._drained)

    def handle_exit(self, sig, frame) -> None:
        """A stop signal: stop now, or start the drain (only records: an interval timer ends it).

        A worker forked after the master began its stop (the master's
        listener copy is gone) does not drain: its drain would outlast the
        master's. A SIGTERM during the drain is a repeat (the master's own,
        or a group's); SIGINT and SIGQUIT end the drain at once.
        """
        if self._draining and sig == signal.SIGTERM:
            return
        if not self._draining and self.drain_seconds > 0 and self.alive and self._master_listening():
            self._draining = True
            signal.setitimer(signal.ITIMER_REAL, self.drain_seconds)
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        super().handle_exit(sig, frame)

    def _drained(self, sig, frame) -> None:
        super().handle_exit(sig, frame)

    def _master_listening(self) -> bool:
        return all(_holds(self.ppid, listener) for listener in self.sockets)

    def load_wsgi(self) -> None:
        """Wrap the app: ``Connection: close`` on an answer that starts once the stop has
        begun, or after a request body that could not be read.

        Decided when the app calls ``start_response``, before the headers are
        written: an answer whose headers already went out with keep-alive is
        left alone (marking its request then would make gunicorn drop the
        client's next request on that connection unanswered); the linger
        below covers it. A body whose framing is broken (a bad chunk size,
        say) is the app's to answer (400), but nothing after it on the
        connection can be parsed: gunicorn would try to read the rest of the
        body and write a second answer of its own.
        """
        super().load_wsgi()
        app = self.wsgi

        def closing_when_needed(environ, start_response):
            req = getattr(self._request, "req", None)
            if req is not None:
                environ["wsgi.input"] = _ClosingOnError(environ["wsgi.input"], req)

            def start(status, headers, exc_info=None):
                if not self.alive and req is not None:
                    req.force_close()
                return start_response(status, headers, exc_info)

            return app(environ, start)

        self.wsgi = closing_when_needed


class ThreadWorker(_ClosingApp, gthread.ThreadWorker):
    """gthread, with the stop described in the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._listening = True

    def handle_request(self, req, conn):  # in a pool thread
        self._request.req = req
        try:
            return super().handle_request(req, conn)
        finally:
            self._request.req = None

    def _keepalive_after(self, conn, keepalive):
        """gthread reads the rest of an answered request's body before the next request.

        When that body's framing is broken (the app never read it), gunicorn
        would write a 400 of its own after the app's answer: a second answer
        to one request, which the client would take for the answer to its
        next one. The connection is closed instead: nothing more on it can
        be parsed.
        """
        try:
            return super()._keepalive_after(conn, keepalive)
        except (OSError, ParseException):
            return False

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread calls this with False as its first step of the stop (main thread)."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive and self._listening:
            self._listening = False
            self._drain_and_close_listeners()

    def _drain_and_close_listeners(self) -> None:
        def serve(listener, client: socket.socket, addr: object) -> None:
            self.nr_conns += 1
            client.setblocking(True)
            self.enqueue_req(gthread.TConn(self.cfg, client, addr, listener.getsockname()))

        for listener in self.sockets:
            _hand_over(listener, self.ppid, serve)

    def _cap_keepalive(self, deadline: float) -> None:
        """At the stop: close idle kept-alive connections now, recent ones after the linger.

        gthread calls this once when its loop ends, then closes each
        connection when its ``timeout`` passes, after dispatching any that
        became readable (a request arrived: it is served, with close).
        """
        now = time.monotonic()
        for conn in self.keepalived_conns:  # ordered by timeout; this keeps the order
            conn.timeout = min(conn.timeout, max(now, conn.answered_at + STOP_IDLE_LINGER))

    def finish_request(self, conn, fs) -> None:
        """Note when each kept-alive connection was answered; during the stop, keep it briefly."""
        super().finish_request(conn, fs)
        if self.keepalived_conns and self.keepalived_conns[-1] is conn:
            conn.answered_at = now = time.monotonic()
            if not self.alive:
                conn.timeout = min(conn.timeout, now + STOP_IDLE_LINGER)


class UnreadableBody(OSError):
    """The request body could not be read: broken framing, or the client left mid-body.

    Raised instead of gunicorn's own parse errors (not all of them are
    OSErrors), so the app can answer 400 without knowing the server.
    """


class _ClosingOnError:
    """A request body that marks its connection for closing if it cannot be read."""

    def __init__(self, body, req) -> None:
        self._body = body
        self._req = req

    def _reading(self, method: str, *args):
        try:
            return getattr(self._body, method)(*args)
        except (OSError, ParseException) as error:  # InvalidChunkSize, NoMoreData, InvalidHeader...
            self._req.force_close()
            raise UnreadableBody(str(error) or type(error).__name__) from error

    def read(self, *args):
        return self._reading("read", *args)

    def readline(self, *args):
        return self._reading("readline", *args)

    def readlines(self, *args):
        return self._reading("readlines", *args)

    def __iter__(self):
        return iter(self.readline, b"")

    def __getattr__(self, name: str):
        return getattr(self._body, name)


class SyncWorker(_ClosingApp, sync.SyncWorker):
    """sync (one request at a time, no keep-alive): drain the accept queue, then close."""

    def handle_request(self, listener, req, client, addr):
        self._request.req = req
        try:
            return super().handle_request(listener, req, client, addr)
        finally:
            self._request.req = None

    def run(self) -> None:
        super().run()  # returns once the stop is seen, after the request in hand

        def serve(listener, client: socket.socket, addr: object) -> None:
            client.setblocking(True)
            self.handle(listener, client, addr)  # answered with Connection: close

        for listener in self.sockets:
            _hand_over(listener, self.ppid, serve)


