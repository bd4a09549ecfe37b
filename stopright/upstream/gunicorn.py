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
SIGINT), in its main thread:

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

Selected by ``worker_class`` (stopright/gunicorn_hooks.py). Both classes
subclass gunicorn 27's own workers and override only what is named here;
the socket work is in stopright/listener.py. The master's stop signals are
made graceful here too (:func:`graceful_master`).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

from gunicorn.http.errors import ParseException
from gunicorn.workers import gthread, sync

from stopright.listener import hand_over, holds

#: What this module relies on that gunicorn does not promise (tests/unit/test_upstream_shapes_gunicorn.py).
REACHES = {
    "gunicorn.arbiter.Arbiter.handle_term / handle_int / handle_quit / handle_alrm":
        "replaced on the instance (handle_alrm added): the loop looks each up by name; handle_term's "
        "StopIteration is the graceful stop",
    "gunicorn.arbiter.Arbiter.signal / kill_workers": "queue SIGALRM like any signal; tell workers",
    "gunicorn.arbiter.Arbiter.spawn_worker: worker_exit in the worker's finally, after sys.exit":
        "stopright/gunicorn_hooks.py worker_exit takes the exit code from the SystemExit on its way out",
    "gunicorn.workers.base.Worker.init_signals / handle_exit / load_wsgi / alive / ppid / sockets / wsgi / "
    "cfg / pid": "overridden or read",
    "gunicorn.workers.gthread.ThreadWorker.set_accept_enabled / _keepalive_after / finish_request / "
    "_cap_keepalive / handle_request / enqueue_req / keepalived_conns / nr_conns": "overridden or read",
    "gunicorn.workers.gthread.TConn(cfg, sock, client, server)": "built for connections we accept",
    "gunicorn.workers.sync.SyncWorker.run / handle / handle_request": "overridden or called",
    "gunicorn.http.message.Request.force_close": "an answer that must say Connection: close",
}

#: How long a connection answered (with keep-alive) just before or during
#: the stop stays open for the client's next request: long enough for a
#: client that reuses its connection at once (well under a millisecond on a
#: LAN), short enough not to hold the stop (stock gthread: 2 s).
STOP_IDLE_LINGER = 0.5


class _ClosingApp:
    """Both worker classes: graceful on every stop signal, after an optional drain;
    the app wrapped to close connections that must not be reused."""

    alive: bool
    wsgi: Callable[..., object]
    #: Serve on this long after the first stop signal (set by stopright's ``post_fork`` hook).
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
        return all(holds(self.ppid, listener) for listener in self.sockets)

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
            hand_over(listener, self.ppid, serve)

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
            hand_over(listener, self.ppid, serve)


def graceful_master(server, on_stop: Callable[[int], bool]) -> None:
    """The master: SIGINT and SIGQUIT as graceful as SIGTERM; ``on_stop`` may hold the stop (a drain).

    gunicorn's master only queues a signal in its handler and calls
    ``handle_term``, ``handle_int``, ``handle_quit`` and ``handle_alrm`` from
    its loop, so ``on_stop(signum)`` runs there, free to log. It returns
    True to stop now (gunicorn's graceful stop), False to go on serving; a
    SIGALRM (queued like any signal: ``server.signal``) then stops. Stock
    gunicorn takes SIGINT and SIGQUIT as its quick stop: requests in flight
    get HTTP 500 or a cut answer.
    """
    graceful = server.handle_term  # raises StopIteration: gunicorn's graceful stop

    def handle(signum: int) -> None:
        if on_stop(signum):
            graceful()

    server.handle_term = lambda: handle(signal.SIGTERM)
    server.handle_int = lambda: handle(signal.SIGINT)
    server.handle_quit = lambda: handle(signal.SIGQUIT)
    server.handle_alrm = graceful  # the drain is over
    signal.signal(signal.SIGALRM, server.signal)
