"""The cheap shape checks of the gunicorn parts (stopright/upstream/support.py), run in the master at start.

Static only: no arbiter, worker or socket is built (the repository's shape
tests do that too, and stop a real master).
"""

from __future__ import annotations

import signal

from gunicorn.arbiter import Arbiter
from gunicorn.http import message
from gunicorn.workers import base, gthread, sync

from stopright.upstream import gunicorn as G
from stopright.upstream import shapes


def master() -> None:
    """The master's stop: its handlers looked up by name, the queue, the stop's order, the USR2 pids."""
    key = "gunicorn.arbiter.Arbiter.handle_term / handle_int / handle_quit / handle_alrm"
    for name in ("handle_term", "handle_int", "handle_quit"):
        shapes.check_signature(key, getattr(Arbiter, name), "self")
    shapes.check_text(key, Arbiter.handle_term, ["raise StopIteration"], "handle_term is the graceful stop")
    shapes.check_text(key, Arbiter.run,
                      ["handler = getattr(self, 'handle_%s' % signame, None)", "handler()"],
                      "the loop looks each handler up on the instance, by the signal's name")
    names = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit", signal.SIGALRM: "alrm"}
    if any(Arbiter.SIG_NAMES.get(signum) != name for signum, name in names.items()):
        shapes.fail(key, "gunicorn changed Arbiter.SIG_NAMES", "re-read graceful_master")
    key = "gunicorn.arbiter.Arbiter.signal / kill_workers"
    shapes.check_signature(key, Arbiter.signal, "self, sig, frame")
    shapes.check_calls(key, Arbiter.signal, ["self.SIG_QUEUE.put_nowait(sig)"], "the handler only queues")
    shapes.check_signature(key, Arbiter.kill_workers, "self, sig")
    key = ("gunicorn.arbiter.Arbiter.stop: closes the listeners, then kill_workers; "
           "takes INT/QUIT from SIG_QUEUE")
    shapes.check_calls(key, Arbiter.stop, ["sock.close_sockets(self.LISTENERS", "self.kill_workers(sig)"],
                       "the listeners are closed when the workers are told to stop")
    shapes.check_text(key, Arbiter.stop, ["pending_sig = self.SIG_QUEUE.get_nowait()",
                                          "if pending_sig in (signal.SIGINT, signal.SIGQUIT):"],
                      "a SIGINT or SIGQUIT queued during the graceful stop makes it quick: not ours")
    key = "gunicorn.arbiter.Arbiter.master_pid / reexec_pid / LISTENERS (USR2 upgrade)"
    shapes.check_text(key, Arbiter.start, ["self.master_pid = int(os.environ.get('GUNICORN_PID'))",
                                           "self.cfg.on_starting(self)", "os.environ.pop('GUNICORN_FD')"],
                      "on_starting sees the old master's pid and, still in the environment, inherited fds")
    shapes.check_text(key, Arbiter.reap_workers, ["if self.reexec_pid == wpid:", "self.reexec_pid = 0"],
                      "0 once the new master is gone")


def workers() -> None:
    """stopright's worker classes: every hook they override, the stop sequences they rely on."""
    key = ("gunicorn.workers.base.Worker.init_signals / handle_exit / load_wsgi / alive / ppid / sockets / "
           "wsgi / cfg / pid")
    for ours in (G.ThreadWorker, G.SyncWorker):
        for name in ("init_signals", "handle_exit", "load_wsgi"):
            shapes.check_override(key, ours, name)
    shapes.check_calls(key, base.Worker.init_process,
                       ["self.init_signals()", "self.load_wsgi()", "self.run()"],
                       "our signals and app wrapper are in place before the worker serves")
    key = ("gunicorn.workers.gthread.ThreadWorker.set_accept_enabled / _keepalive_after / finish_request / "
           "_cap_keepalive / handle_request / enqueue_req / keepalived_conns / nr_conns")
    for name in ("set_accept_enabled", "_keepalive_after", "finish_request", "_cap_keepalive",
                 "handle_request"):
        shapes.check_override(key, G.ThreadWorker, name)
    shapes.check_signature(key, gthread.ThreadWorker.enqueue_req, "self, conn")
    shapes.check_calls(key, gthread.ThreadWorker.handle,
                       ["self._keepalive_after(conn, self.handle_request(req, conn))"],
                       "each answered request goes through both")
    shapes.check_signature("gunicorn.workers.gthread.TConn(cfg, sock, client, server)", gthread.TConn,
                           "self, cfg, sock, client, server")
    key = "gunicorn.workers.sync.SyncWorker.run / handle / handle_request"
    shapes.check_override(key, G.SyncWorker, "run")
    shapes.check_override(key, G.SyncWorker, "handle_request")
    shapes.check_signature(key, sync.SyncWorker.handle, "self, listener, client, addr")
    shapes.check_calls(key, sync.SyncWorker.handle_request, ["resp.force_close()", "self.wsgi(environ, "],
                       "every sync answer says Connection: close, through the app, wrapped")
    shapes.check_attributes("gunicorn.http.message.Request.force_close", message.Request,
                            ["force_close", "should_close"])
    key = "gunicorn.arbiter.Arbiter.spawn_worker: worker_exit in the worker's finally, after sys.exit"
    shapes.check_text(key, Arbiter.spawn_worker, ["worker.pid = os.getpid()", "sys.exit(0)",
                                             "self.cfg.worker_exit(self, worker)"],
                      "worker_exit runs in the worker's finally, with the exit code on its way out")
