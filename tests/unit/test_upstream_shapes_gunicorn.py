"""Upgrade-shape tests: every reach of stopright/upstream/gunicorn.py into gunicorn.

One check per key of its ``REACHES``, against the installed gunicorn, with real objects
(an Arbiter, worker instances, a parsed Request and its Response on a socket pair; nothing
forked, no process started): the signature of every hook overridden or called, the call sites
whose behaviour the stop relies on (gthread's stop sequence, the sync worker leaving its
listeners open, worker_exit running inside the SystemExit), every attribute read.
"""

from __future__ import annotations

import ast
import io
import os
import signal
import socket
import subprocess
import sys

import pytest
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config
from gunicorn.http import message, wsgi
from gunicorn.http.parser import RequestParser
from gunicorn.workers import base, gthread, sync

from stopright.upstream import gunicorn as G
from tests import shapes

CHECKS = shapes.Checks()
shape = CHECKS


class _App(BaseApplication):
    """The smallest gunicorn application: no command line, no config file."""

    def load_config(self) -> None:
        pass

    def load(self):
        def app(environ, start_response):
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        return app


def _worker(cls: type, app: BaseApplication | None = None):
    """A worker instance as the arbiter builds it before the fork (its tmp file closed by the caller)."""
    return cls(0, os.getpid(), [], app or _App(), 30, Config(), None)


def _request(raw: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") -> message.Request:
    return next(RequestParser(Config(), iter([raw]), ("127.0.0.1", 5)))


def _calls_after_loop(fn, loop_test: str) -> list[str]:
    """The calls of ``fn``'s top-level statements after its ``while <loop_test>:`` loop, in order."""
    body = shapes.function_tree(fn).body
    loop = next((i for i, node in enumerate(body)
                 if isinstance(node, ast.While) and ast.unparse(node.test) == loop_test), None)
    if loop is None:
        shapes.fail(GTHREAD, f"gunicorn changed {fn.__qualname__}: no 'while {loop_test}:' loop any more",
                    "re-read it: stopright/upstream/gunicorn.py relies on what follows the loop")
    return [call for node in body[loop + 1:] for call in shapes.calls(node)]


# -- the master --------------------------------------------------------------------------------------

HANDLERS = "gunicorn.arbiter.Arbiter.handle_term / handle_int / handle_quit / handle_alrm"


@shape(G, HANDLERS)
def _(key: str) -> None:
    for name in ("handle_term", "handle_int", "handle_quit"):
        shapes.check_signature(HANDLERS, getattr(Arbiter, name), "self")
    shapes.check_text(HANDLERS, Arbiter.handle_term, ["raise StopIteration"],
                      "handle_term is the graceful stop")
    shapes.check_text(HANDLERS, Arbiter.run, ["handler = getattr(self, 'handle_%s' % signame, None)",
                                              "handler()", "except (StopIteration, KeyboardInterrupt):\n"
                                              "self.halt()"],
                      "the loop looks each handler up on the instance, by the signal's name")
    names = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit", signal.SIGALRM: "alrm"}
    for signum, name in names.items():
        assert Arbiter.SIG_NAMES.get(signum) == name, f"{HANDLERS}: SIG_NAMES[{signum!r}] is not {name!r}"
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGALRM, signal.SIGINT, signal.SIGQUIT)}
    try:  # graceful_master's stop makes SIGINT and SIGQUIT repeats in this process
        _graceful_master_on_a_real_arbiter()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _graceful_master_on_a_real_arbiter() -> None:
    """graceful_master on a real Arbiter: what its loop would call for each signal, and when it stops."""
    server = Arbiter(_App())
    asked: list[int] = []
    alarm = signal.getsignal(signal.SIGALRM)
    G.graceful_master(server, lambda signum: asked.append(signum) or signum != signal.SIGTERM)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGALRM):
        handler = getattr(server, f"handle_{server.SIG_NAMES[signum]}")
        if signum == signal.SIGTERM:
            handler()  # on_stop said: serve on
        else:
            with pytest.raises(StopIteration):
                handler()
    assert asked == [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT], asked
    assert signal.getsignal(signal.SIGALRM) == alarm, "SIGALRM is the app's: stopright must not take it"
    G.end_drain_after(server, 0).join(10)  # the drain's end, from a thread
    assert server.SIG_QUEUE.get_nowait() == signal.SIGALRM, "Arbiter.signal no longer queues the signal"
    server.kill_workers(signal.SIGTERM)  # no worker: nothing sent, but the call's shape holds


@shape(G, "gunicorn.arbiter.Arbiter.signal / kill_workers")
def _(key: str) -> None:
    shapes.check_signature(key, Arbiter.signal, "self, sig, frame")
    shapes.check_calls(key, Arbiter.signal, ["self.SIG_QUEUE.put_nowait(sig)"], "the handler only queues")
    shapes.check_signature(key, Arbiter.kill_workers, "self, sig")
    shapes.check_calls(key, Arbiter.kill_workers, ["self.kill_worker(pid, sig)"], "every worker is told")
    shapes.check_attributes(key, Arbiter, ["SIG_NAMES", "WORKERS"])


@shape(G, "gunicorn.arbiter.Arbiter.spawn_worker: worker_exit in the worker's finally, after sys.exit")
def _(key: str) -> None:
    shapes.check_text(key, Arbiter.spawn_worker, ["worker.pid = os.getpid()"], "worker_exit compares pids")
    tree = shapes.function_tree(Arbiter.spawn_worker)
    tries = [node for node in ast.walk(tree) if isinstance(node, ast.Try)]
    for node in tries:
        body = [c for stmt in node.body for c in shapes.calls(stmt)]
        final = [c for stmt in node.finalbody for c in shapes.calls(stmt)]
        reraised = any(ast.unparse(h.type) == "SystemExit" and isinstance(h.body[0], ast.Raise)
                       and h.body[0].exc is None for h in node.handlers if h.type is not None)
        if "worker.init_process()" in body and "sys.exit(0)" in body and reraised \
                and "self.cfg.worker_exit(self, worker)" in final:
            return
    shapes.fail(key, "gunicorn changed Arbiter.spawn_worker: worker_exit is no longer called in the worker's "
                "finally while its SystemExit propagates", "re-read it and stopright/gunicorn_hooks.py "
                "worker_exit (the exit code it passes to os._exit)")


STOP = "gunicorn.arbiter.Arbiter.stop: closes the listeners, then kill_workers; takes INT/QUIT from SIG_QUEUE"
# A master with one real listener and no worker, stopped by a SIGINT through graceful_master,
# then sent a SIGQUIT during its stop; in a child (the stop changes its signal handlers).
STOPPING = """
import os, signal
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn import sock
from stopright.upstream import gunicorn as G

class App(BaseApplication):
    def load_config(self):
        self.cfg.set("bind", ["127.0.0.1:0"])
    def load(self):
        return None

server = Arbiter(App())
server.LISTENERS = sock.create_sockets(server.cfg, server.log)
listener = server.LISTENERS[0]
notes = G.graceful_master(server, lambda signum: True)
told = []
tell = server.kill_workers

def kill_workers(sig):
    told.append((int(sig), listener.sock is None))  # gunicorn drops its socket when closing it
    tell(sig)

server.kill_workers = kill_workers
try:
    server.handle_int()
except StopIteration:
    pass
os.kill(os.getpid(), signal.SIGQUIT)  # a repeat during the stop: not queued
server.stop()
print(notes.closed, notes.alone, told[0], server.SIG_QUEUE.empty())
"""


@shape(G, STOP)
def _(key: str) -> None:
    shapes.check_calls(key, Arbiter.stop, ["sock.close_sockets(self.LISTENERS", "self.kill_workers(sig)"],
                       "the listeners are closed when the workers are told to stop")
    shapes.check_text(key, Arbiter.stop, ["self.LISTENERS = []", "pending_sig = self.SIG_QUEUE.get_nowait()",
                                          "if pending_sig in (signal.SIGINT, signal.SIGQUIT):",
                                          "limit = time.time() + 2.0"],
                      "a SIGINT or SIGQUIT queued during the graceful stop makes it quick: not ours")
    done = subprocess.run([sys.executable, "-c", STOPPING], capture_output=True, text=True, timeout=60)
    expected = f"True True ({int(signal.SIGTERM)}, True) True"
    if done.returncode != 0 or done.stdout.strip() != expected:
        shapes.fail(key, f"gunicorn changed Arbiter.stop: a master stopped through graceful_master printed "
                    f"{done.stdout.strip()!r} (expected {expected!r}), rc {done.returncode}: "
                    f"{done.stderr.strip()[-300:]}", "re-read it and graceful_master's stop")


UPGRADE = "gunicorn.arbiter.Arbiter.master_pid / reexec_pid / LISTENERS (USR2 upgrade)"


@shape(G, UPGRADE)
def _(key: str) -> None:
    server = Arbiter(_App())
    shapes.check_attributes(key, server, ["master_pid", "reexec_pid", "LISTENERS"])
    assert (server.master_pid, server.reexec_pid, G.upgraded_from(server)) == (0, 0, 0), key
    shapes.check_text(key, Arbiter.start, ["self.master_pid = int(os.environ.get('GUNICORN_PID'))",
                                           "self.cfg.on_starting(self)", "systemd.listen_fds()",
                                           "os.environ.pop('GUNICORN_FD')"],
                      "on_starting sees the old master's pid and, still in the environment, inherited fds")
    shapes.check_text(key, Arbiter.reexec, ["self.reexec_pid = os.fork()", "environ['GUNICORN_PID'] = str(",
                                            "environ['GUNICORN_FD'] = ','.join("],
                      "a USR2 re-exec: the new master shares the listeners")
    shapes.check_text(key, Arbiter.reap_workers, ["if self.reexec_pid == wpid:", "self.reexec_pid = 0"],
                      "0 once the new master is gone")
    shapes.check_text(key, Arbiter.maybe_promote_master,
                      ["if self.master_pid != os.getppid():", "self.master_pid = 0"],
                      "0 once the old one is gone")


ADDRESS = "gunicorn.config.Config.address: fd:// binds as ints; GUNICORN_FD, LISTEN_FDS read later"


@shape(G, ADDRESS)
def _(key: str) -> None:
    cfg = Config()
    cfg.set("bind", ["fd://5", "127.0.0.1:0"])
    if cfg.address != [5, ("127.0.0.1", 0)]:
        shapes.fail(key, f"gunicorn changed Config.address: {cfg.address!r} for fd://5 and 127.0.0.1:0",
                    "re-read it and inherited_listeners in stopright/upstream/gunicorn.py")
    server = Arbiter(_App())
    server.cfg.set("bind", ["fd://5"])
    os.environ["GUNICORN_FD"] = "7,8"
    try:
        assert G.inherited_listeners(server) == ([5, 7, 8], True), key
    finally:
        del os.environ["GUNICORN_FD"]
    # Arbiter.start reading them after on_starting: checked with the upgrade's reach above.


# -- both worker classes ---------------------------------------------------------------------------------

BASE = ("gunicorn.workers.base.Worker.init_signals / handle_exit / load_wsgi / alive / ppid / sockets / "
        "wsgi / cfg / pid")


@shape(G, BASE)
def _(key: str) -> None:
    for ours in (G.ThreadWorker, G.SyncWorker):
        for name in ("init_signals", "handle_exit", "load_wsgi"):
            shapes.check_override(BASE, ours, name)
        worker = _worker(ours)
        try:
            shapes.check_attributes(BASE, worker, ["alive", "ppid", "sockets", "cfg", "pid"])
        finally:
            worker.tmp.close()
    shapes.check_calls(BASE, base.Worker.init_process,
                       ["self.init_signals()", "self.load_wsgi()", "self.cfg.post_worker_init(self)",
                        "self.run()"],
                       "our signals and app wrapper are in place before the worker serves")
    shapes.check_text(BASE, base.Worker.load_wsgi, ["self.wsgi = self.app.wsgi()"], "the app is self.wsgi")
    shapes.check_text(BASE, base.Worker.init_signals, ["signal.signal(signal.SIGQUIT, self.handle_quit)",
                                                       "signal.signal(signal.SIGINT, self.handle_quit)"],
                      "set before ours, which make both graceful (handle_exit)")


# -- gthread -------------------------------------------------------------------------------------------

GTHREAD = ("gunicorn.workers.gthread.ThreadWorker.set_accept_enabled / _keepalive_after / finish_request / "
           "_cap_keepalive / handle_request / enqueue_req / keepalived_conns / nr_conns")


@shape(G, GTHREAD)
def _(key: str) -> None:
    for name in ("set_accept_enabled", "_keepalive_after", "finish_request", "_cap_keepalive",
                 "handle_request"):
        shapes.check_override(GTHREAD, G.ThreadWorker, name)
    shapes.check_signature(GTHREAD, gthread.ThreadWorker.enqueue_req, "self, conn")
    after = _calls_after_loop(gthread.ThreadWorker.run, "self.alive")
    if not after or after[0] != "self.set_accept_enabled(False)":
        shapes.fail(GTHREAD, f"gunicorn changed ThreadWorker.run: the stop no longer begins with "
                    f"set_accept_enabled(False) (calls after its loop: {after[:3]})",
                    "re-read it and ThreadWorker.set_accept_enabled in stopright/upstream/gunicorn.py")
    caps = [call for call in after if call.startswith("self._cap_keepalive(")]
    in_loop = [c for c in shapes.calls(gthread.ThreadWorker.run) if c.startswith("self._cap_keepalive(")]
    if len(caps) != 1 or len(in_loop) != 1:
        shapes.fail(GTHREAD, f"gunicorn changed ThreadWorker.run: _cap_keepalive is called {len(in_loop)} "
                    f"time(s), {len(caps)} after its loop (we rely on once, as the loop ends)",
                    "re-read it and our _cap_keepalive in stopright/upstream/gunicorn.py")
    shapes.check_calls(GTHREAD, gthread.ThreadWorker.finish_request, ["self.keepalived_conns.append(conn)"],
                       "a kept-alive connection is the last of keepalived_conns after finish_request")
    shapes.check_calls(GTHREAD, gthread.ThreadWorker.handle,
                       ["self._keepalive_after(conn, self.handle_request(req, conn))"],
                       "each answered request goes through both")
    shapes.check_calls(GTHREAD, gthread.ThreadWorker._keepalive_after, ["conn.parser.finish_body("],
                       "reading the rest of the body is what may raise on broken framing")
    shapes.check_calls(GTHREAD, gthread.ThreadWorker.handle_request, ["self.wsgi("], "the app, wrapped")
    worker = _worker(G.ThreadWorker)
    try:
        shapes.check_attributes(GTHREAD, worker, ["keepalived_conns", "nr_conns", "enqueue_req"])
        assert worker.nr_conns == 0 and list(worker.keepalived_conns) == [], GTHREAD
    finally:
        worker.tmp.close()


@shape(G, "gunicorn.workers.gthread.TConn(cfg, sock, client, server)")
def _(key: str) -> None:
    shapes.check_signature(key, gthread.TConn, "self, cfg, sock, client, server")
    ours, theirs = socket.socketpair()
    try:
        conn = gthread.TConn(Config(), ours, ("127.0.0.1", 5), ("127.0.0.1", 6))
        conn.set_timeout()
        assert isinstance(conn.timeout, float), f"{key}: TConn.timeout is no deadline (float) any more"
    finally:
        ours.close()
        theirs.close()


# -- sync ----------------------------------------------------------------------------------------------


@shape(G, "gunicorn.workers.sync.SyncWorker.run / handle / handle_request")
def _(key: str) -> None:
    shapes.check_override(key, G.SyncWorker, "run")
    shapes.check_override(key, G.SyncWorker, "handle_request")
    shapes.check_signature(key, sync.SyncWorker.handle, "self, listener, client, addr")
    for fn in (sync.SyncWorker.run, sync.SyncWorker.run_for_one, sync.SyncWorker.run_for_multiple):
        shapes.check_no_call(key, fn, ".close(", "run() returns with the listeners open: we hand them over")
    shapes.check_calls(key, sync.SyncWorker.handle, ["self.handle_request(listener, req, client, addr)",
                                                     "util.close_graceful(client)"],
                       "handle() answers and closes the connection we accepted")
    shapes.check_calls(key, sync.SyncWorker.handle_request, ["resp.force_close()", "self.wsgi(environ, "],
                       "every sync answer says Connection: close, through the app, wrapped")


# -- the request ---------------------------------------------------------------------------------------


@shape(G, "gunicorn.http.message.Request.force_close")
def _(key: str) -> None:
    shapes.check_attributes(key, message.Request, ["force_close", "should_close"])
    shapes.check_calls(key, wsgi.Response.should_close, ["self.req.should_close()"],
                       "the answer's Connection header follows its request, read when the headers go out")
    req = _request()
    ours, theirs = socket.socketpair()
    worker = _worker(G.ThreadWorker)
    try:
        resp = wsgi.Response(req, ours, Config())
        worker.load_wsgi()  # our wrapper around the app
        worker.alive = False  # the stop has begun
        worker._request.req = req
        environ = {"wsgi.input": io.BytesIO(b"")}
        worker.wsgi(environ, resp.start_response)
        assert req.should_close() and resp.should_close(), \
            f"{key}: an answer started during the stop does not say Connection: close"
    finally:
        worker.tmp.close()
        ours.close()
        theirs.close()


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "key"), CHECKS.cases(), ids=[key for _, key in CHECKS.cases()])
def test_upstream_shape(module: str, key: str) -> None:
    CHECKS.run(module, key)


def test_every_gunicorn_reach_has_a_shape_check() -> None:
    problems = CHECKS.problems({"stopright.upstream.gunicorn"})
    assert not problems, "\n".join(problems)
