"""gunicorn worker classes whose stop never resets a connection the kernel accepted; the master's stop.

The hazard (docs/why.md, section 8): a stopping gunicorn worker keeps its copy of the listening
socket until it exits; when the last process closes it, every connection still queued there is
reset. Stock gthread also keeps each kept-alive connection open for up to 2 s at stop, in case a
request is on its way. What a stopping worker does here, on any stop signal:

1. Every answer that starts after the stop began says ``Connection:
   close`` (long polls in flight answer at once with the job's state), so
   its client will not reuse the connection and cannot be caught by a close.
2. It serves what the kernel queues until nothing more can come, then
   closes its listener (stopright/listener.py ``hand_over``): a client
   turned away is *refused*, never reset, on every bind (TCP, Unix socket,
   a socket shared with the next master or with systemd).
3. Kept-alive connections are closed at once (as Go's
   ``http.Server.Shutdown`` and nginx do), unless a request has already
   arrived on one, which is served. A connection answered less than
   :data:`STOP_IDLE_LINGER` ago is kept that long: its client may be sending
   the next request right now, and closing under it would drop that request.

Selected by ``worker_class`` (stopright/gunicorn_hooks.py). Both classes subclass gunicorn 27's own
workers and override only what is named here. The master's graceful stop: :func:`graceful_master`.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, cast

from gunicorn.http.errors import ParseException
from gunicorn.workers import gthread, sync

from stopright.listener import MasterNotes, hand_over, held_elsewhere, holds, refuse_handshakes

if TYPE_CHECKING:  # the mixin below sees the worker it is mixed into; at run time it is a plain class
    from gunicorn.arbiter import Arbiter
    from gunicorn.http.message import Request
    from gunicorn.workers.base import Worker as _Worker
else:
    _Worker = object

#: What this module relies on that gunicorn does not promise (tests/unit/test_upstream_shapes_gunicorn.py).
REACHES = {
    "gunicorn.arbiter.Arbiter.handle_term / handle_int / handle_quit / handle_alrm":
        "replaced on the instance (handle_alrm added): the loop looks each up by name; handle_term's "
        "StopIteration is the graceful stop",
    "gunicorn.arbiter.Arbiter.signal / kill_workers": "queue SIGALRM like any signal; tell workers "
        "(kill_workers replaced on the instance)",
    "gunicorn.arbiter.Arbiter.stop: closes the listeners, then kill_workers; takes INT/QUIT from SIG_QUEUE":
        "the listeners are closed when it tells the workers; INT/QUIT made repeats (no quick stop)",
    "gunicorn.arbiter.Arbiter.master_pid / reexec_pid / LISTENERS (USR2 upgrade)":
        "the old master (0 once gone), the new one (0 once gone): who else holds the listeners",
    "gunicorn.config.Config.address: fd:// binds as ints; GUNICORN_FD, LISTEN_FDS read later":
        "the listening sockets a master inherits",
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

#: How long a connection answered with keep-alive just before or during the stop stays open for the
#: client's next request: enough for one that reuses it at once, not enough to hold the stop (gthread: 2 s).
STOP_IDLE_LINGER = 0.5


class _ClosingApp(_Worker):
    """Both worker classes: graceful on every stop signal, after an optional drain;
    the app wrapped to close connections that must not be reused."""

    #: Serve on this long after the first stop signal (set by stopright's ``post_fork`` hook).
    drain_seconds = 0.0
    #: The first stop signal, even one while the app loads (``post_worker_init`` then records it).
    first_stop_signal: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request = threading.local()  # the request this thread is handling
        self._draining = False
        self._drained = False
        self._drain_begins = -1  # a pipe's write end, once the drain's thread waits on its read end

    def init_signals(self) -> None:
        """SIGINT and SIGQUIT stop as gracefully as SIGTERM (gunicorn: quick stop, 500s, cut answers).

        A terminal's Ctrl+C, supervisord's and ``honcho export``'s SIGQUIT:
        none of them means "drop the requests in flight". No other signal is
        taken: a thread times the drain (SIGALRM stays the app's).
        """
        super().init_signals()
        for signum in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self.handle_exit)
        if self.drain_seconds > 0:
            begins, self._drain_begins = os.pipe()
            threading.Thread(target=self._drain, args=(begins,), name="drain", daemon=True).start()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """A stop signal: stop now, or start the drain (only records: the drain's thread ends it).

        A worker forked after the master began its stop (the master's
        listener copy is gone) does not drain: its drain would outlast the
        master's. A SIGTERM during the drain is a repeat (the master's own,
        or a group's); SIGINT and SIGQUIT end the drain at once.
        """
        self.first_stop_signal = self.first_stop_signal or sig
        if self._draining and sig == signal.SIGTERM and not self._drained:
            return
        if not self._draining and self._drain_begins >= 0 and self.alive and self._master_listening():
            self._draining = True
            os.write(self._drain_begins, b"!")  # one byte into an empty pipe: never blocks
            return
        super().handle_exit(sig, frame)

    def _drain(self, begins: int) -> None:
        """The drain's thread: once it began, wait it out, then stop (a SIGTERM to ourselves)."""
        os.read(begins, 1)
        time.sleep(self.drain_seconds)
        self._drained = True
        if self.alive:  # not stopped meanwhile by a SIGINT or SIGQUIT
            os.kill(os.getpid(), signal.SIGTERM)

    def _master_listening(self) -> bool:
        return all(holds(self.ppid, listener, _notes) for listener in self.sockets)

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

        def closing_when_needed(environ: MutableMapping[str, Any], start_response: Callable[..., Any]) -> Any:
            req = getattr(self._request, "req", None)
            if req is not None:
                environ["wsgi.input"] = _ClosingOnError(environ["wsgi.input"], req)

            def start(status: str, headers: Iterable[tuple[str, str]], exc_info: Any = None) -> Any:
                if not self.alive and req is not None:
                    req.force_close()
                return start_response(status, headers, exc_info)

            return app(environ, start)

        self.wsgi = closing_when_needed


class ThreadWorker(_ClosingApp, gthread.ThreadWorker):
    """gthread, with the stop described in the module docstring."""

    _listening = True  # until the stop closes the listeners (set_accept_enabled)

    def handle_request(self, req: Request, conn: gthread.TConn) -> bool:  # in a pool thread
        self._request.req = req
        try:
            return super().handle_request(req, conn)
        finally:
            self._request.req = None

    def _keepalive_after(self, conn: gthread.TConn, keepalive: bool) -> bool:
        """gthread reads the rest of an answered request's body before the next request.

        When that body's framing is broken (the app never read it), gunicorn
        would write a 400 of its own after the app's answer: a second answer
        to one request, which the client would take for the answer to its
        next one. The connection is closed instead: nothing more on it can
        be parsed.
        """
        try:
            return super()._keepalive_after(conn, keepalive)  # type: ignore[misc,no-any-return]  # no stub
        except (OSError, ParseException):
            return False

    def set_accept_enabled(self, enabled: bool | None) -> None:
        """gthread calls this with False as its first step of the stop (main thread)."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive and self._listening:
            self._listening = False
            self._drain_and_close_listeners()

    def _drain_and_close_listeners(self) -> None:
        def serve(listener: socket.socket, client: socket.socket, addr: Any) -> None:
            self.nr_conns += 1
            client.setblocking(True)
            self.enqueue_req(gthread.TConn(self.cfg, client, addr, listener.getsockname()))

        for listener in self.sockets:
            hand_over(listener, self.ppid, serve, _notes)

    def _cap_keepalive(self, deadline: float) -> None:
        """At the stop: close idle kept-alive connections now, recent ones after the linger.

        gthread calls this once when its loop ends, then closes each
        connection when its ``timeout`` passes, after dispatching any that
        became readable (a request arrived: it is served, with close).
        """
        now = time.monotonic()
        for conn in self.keepalived_conns:  # ordered by timeout; this keeps the order
            conn.timeout = min(conn.timeout, max(now, conn.answered_at + STOP_IDLE_LINGER))  # type: ignore[attr-defined]


    def finish_request(self, conn: gthread.TConn, fs: Any) -> None:
        """Note when each kept-alive connection was answered; during the stop, keep it briefly."""
        super().finish_request(conn, fs)
        if self.keepalived_conns and self.keepalived_conns[-1] is conn:
            conn.answered_at = now = time.monotonic()  # type: ignore[attr-defined]
            if not self.alive:
                conn.timeout = min(conn.timeout, now + STOP_IDLE_LINGER)  # type: ignore[type-var]


class UnreadableBody(OSError):
    """The request body could not be read: broken framing, or the client left mid-body.

    Raised instead of gunicorn's own parse errors (not all of them are
    OSErrors), so the app can answer 400 without knowing the server.
    """


class _ClosingOnError:
    """A request body that marks its connection for closing if it cannot be read."""

    def __init__(self, body: Any, req: Request) -> None:
        self._body = body
        self._req = req

    def _reading(self, method: str, *args: object) -> Any:
        try:
            return getattr(self._body, method)(*args)
        except (OSError, ParseException) as error:  # InvalidChunkSize, NoMoreData, InvalidHeader...
            self._req.force_close()
            raise UnreadableBody(str(error) or type(error).__name__) from error

    def read(self, *args: object) -> Any:
        return self._reading("read", *args)

    def readline(self, *args: object) -> Any:
        return self._reading("readline", *args)

    def readlines(self, *args: object) -> Any:
        return self._reading("readlines", *args)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.readline, b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)


class SyncWorker(_ClosingApp, sync.SyncWorker):
    """sync (one request at a time, no keep-alive): drain the accept queue, then close."""

    def handle_request(self, listener: socket.socket, req: Request, client: socket.socket, addr: Any) -> bool:
        self._request.req = req
        try:
            return super().handle_request(listener, req, client, addr)
        finally:
            self._request.req = None

    def run(self) -> None:
        super().run()  # returns once the stop is seen, after the request in hand

        def serve(listener: socket.socket, client: socket.socket, addr: Any) -> None:
            client.setblocking(True)
            self.handle(listener, client, addr)  # answered with Connection: close

        for listener in self.sockets:
            hand_over(listener, self.ppid, serve, _notes)


#: The master's notes to its workers (stopright/listener.py), made by :func:`graceful_master` before any fork.
_notes: MasterNotes | None = None


def graceful_master(server: Arbiter, on_stop: Callable[[int], bool], *,
                    from_outside: bool = False) -> MasterNotes:
    """The master: SIGINT and SIGQUIT as graceful as SIGTERM; ``on_stop`` may hold the stop (a drain).

    gunicorn's master only queues a signal in its handler and calls
    ``handle_term``, ``handle_int``, ``handle_quit`` and ``handle_alrm`` from
    its loop, so ``on_stop(signum)`` runs there, free to log. It returns
    True to stop now (gunicorn's graceful stop), False to go on serving;
    :func:`end_drain_after` then stops. Stock gunicorn takes SIGINT and
    SIGQUIT as its quick stop (:meth:`_ClosingApp.init_signals`); here, once
    stopping, they are repeats (:func:`_repeats_only`).

    At the stop the master tells its workers (:class:`MasterNotes`) whether
    another server holds the listening sockets too, and when it closed its
    copies. ``from_outside``: some came from outside gunicorn (systemd's
    ``LISTEN_FDS``, an ``fd://`` bind), whose sender may keep them.
    """
    global _notes
    notes = _notes = MasterNotes()
    graceful = server.handle_term  # raises StopIteration: gunicorn's graceful stop
    tell_workers = server.kill_workers
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        _repeats_only(server)
        _tell_sharing(server, notes, from_outside)
        graceful()

    def handle(signum: int) -> None:
        if on_stop(signum):
            stop()

    def kill_workers(sig: int) -> None:
        if stopping and not server.LISTENERS:  # Arbiter.stop() closed them first thing, then tells them
            notes.note_closed()
        tell_workers(sig)

    server.handle_term = lambda: handle(signal.SIGTERM)  # type: ignore[method-assign]
    server.handle_int = lambda: handle(signal.SIGINT)  # type: ignore[method-assign]
    server.handle_quit = lambda: handle(signal.SIGQUIT)  # type: ignore[method-assign]
    server.handle_alrm = stop  # type: ignore[attr-defined]  # the drain is over (end_drain_after)
    server.kill_workers = kill_workers  # type: ignore[method-assign]
    return notes


def end_drain_after(server: Arbiter, seconds: float) -> threading.Timer:
    """The master: its graceful stop in ``seconds``, from a timer thread (SIGALRM stays the app's).

    The thread queues SIGALRM's number like a signal handler would
    (``server.signal``): the master's loop then runs ``handle_alrm``.
    """
    timer = threading.Timer(seconds, server.signal, (signal.SIGALRM, None))
    timer.daemon = True
    timer.start()
    return timer


def _repeats_only(server: Arbiter) -> None:
    """The graceful stop begins: a later SIGINT or SIGQUIT must not turn it into gunicorn's quick one.

    ``Arbiter.stop()`` takes each from the signal queue while it waits for
    the workers, and then SIGKILLs them 2 s later. They are repeats (a
    second Ctrl+C, a manager's QUIT after its TERM): no longer queued, and
    any already waiting there dropped (the stop would drop the others too).
    """
    for signum in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, lambda signum, frame: None)
    while not server.SIG_QUEUE.empty():  # only this thread takes from it
        server.SIG_QUEUE.get_nowait()


def _tell_sharing(server: Arbiter, notes: MasterNotes, from_outside: bool) -> None:
    """Whether a process outside this server holds the listeners too; if not, TCP handshakes refused.

    Another server does after a ``USR2`` upgrade (the new master, or the
    old one not yet gone), or the sender of sockets from outside (systemd's
    socket unit keeps them): anything that refuses connections is on the
    socket itself, so it would refuse them for that server too, a silent
    outage. The master refuses TCP handshakes itself, just before closing:
    the socket filter may need a privilege its workers dropped (``user=``).
    """
    listeners = cast("list[socket.socket]", server.LISTENERS)  # gunicorn's sockets pass on what they lack
    old = server.master_pid  # the master before a USR2 upgrade: a holder till it is gone
    shared = bool(server.reexec_pid) or (old != 0 and old == os.getppid())
    if not shared and from_outside:
        shared = held_elsewhere(listeners, os.getpid()) is not False  # not known: assume so
    refused = [] if shared else [refuse_handshakes(lr) for lr in listeners if lr.family != socket.AF_UNIX]
    notes.note_sharing(shared, refusing=bool(refused) and all(refused))


def inherited_listeners(server: Arbiter) -> tuple[list[int], bool]:
    """The master, at start: the listening sockets it inherits (fds), and whether some come from outside.

    From the master before it (``USR2``: ``GUNICORN_FD``), from systemd's
    socket activation (``LISTEN_FDS`` for ``LISTEN_PID``), or named on the
    command line (``fd://`` binds): the last two from outside gunicorn.
    """
    fds = [bind for bind in server.cfg.address if isinstance(bind, int)]
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS", "").isdigit():
        fds += range(3, 3 + int(os.environ["LISTEN_FDS"]))  # sd_listen_fds(3)
    outside = bool(fds)
    fds += [int(fd) for fd in os.environ.get("GUNICORN_FD", "").split(",") if fd.isdigit()]
    return fds, outside


def upgraded_from(server: Arbiter) -> int:
    """The master, at start: the pid of the master whose ``USR2`` started this one (it leaves first), or 0."""
    return server.master_pid
