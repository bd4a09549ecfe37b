"""gunicorn for the web process: settings, then lifecycle hooks.

Stop signals and what they do here (every stop signal is graceful):
  SIGTERM (honcho, systemd, Heroku, Kubernetes; under honcho to the master
      *and* workers at once), SIGINT (Ctrl+C of ``gunicorn`` run directly)
      and SIGQUIT (supervisord's and ``honcho export``'s default): workers
      finish the requests in flight (long polls answer at once with the
      job's current state), then ``worker_exit`` closes their connections;
      the master waits ``graceful_timeout`` at most. Stock gunicorn takes
      SIGINT and SIGQUIT as its quick stop: requests in flight get HTTP 500
      or a cut answer.
  With ``SHUTDOWN_DRAIN_SECONDS`` > 0, the first stop signal starts a drain
      first: the master and every worker serve on, ``/readyz`` answers 503,
      so a load balancer or Kubernetes Service stops routing here before the
      listener closes (closing at once refuses what it still sends). The
      master tells its workers (SIGTERM) in case only it got the signal
      (PID 1 of a container); a second SIGINT or SIGQUIT ends the drain.
"""

import logging
import math
import os
import signal
import sys

from app import budget, shutdown
from core import db, forks, logs
from core.config import get_settings

_settings = get_settings()
logs.set_role("web")  # the master; post_fork renames its workers

# -- server ----------------------------------------------------------------
# The app is named here, not on the command line: the Procfile entry then has
# no shell syntax to quote ("()"), and reads the same under every manager.
wsgi_app = "app:create_app()"
bind = [f"{_settings.bind_host}:{_settings.port}"]
workers = _settings.web_workers
# gthread: a long poll (GET /jobs/<id>?wait=) holds a thread, not a process.
# sync works too (WEB_WORKER_CLASS=sync): its SIGINT hazard is the worst (500s).
# Either way gunicorn's own class with a stop that resets no accepted
# connection and closes idle kept-alive ones at once (app/web_worker.py).
worker_class = {"gthread": "app.web_worker.ThreadWorker", "sync": "app.web_worker.SyncWorker"}[
    _settings.web_worker_class]
threads = _settings.web_threads if _settings.web_worker_class == "gthread" else 1  # >1: sync is gthread
proc_name = "web"
preload_app = False  # the master opens no connection; each worker opens its own
control_socket_disable = True  # no extra master thread and socket to stop

# Loaded by every worker (most of them lazily, on the first request): imported
# once in the master instead, so the workers share the pages (forks.share_with_forks).
SHARED_MODULES = ("flask", "sqlalchemy.dialects.sqlite", "app.api", "tasks.jobs", "celery.app.task",
                  "celery.canvas", "celery.result", "celery.loaders.app", "kombu.transport.redis")

# -- shutdown --------------------------------------------------------------
_budget = budget.current()
graceful_timeout = math.ceil(_budget.grace)  # budget shared with the worker
keepalive = 2
CLOSE_BUDGET = 1.0  # for the registry at exit: every connection closed, or given up, within it

# -- logging ---------------------------------------------------------------
logconfig_dict = logs.logging_config()  # LOG_LEVEL, validated above by get_settings()


def on_starting(server):
    """Master: every stop signal graceful, after the drain; log it; stop if the manager dies."""
    shutdown.stop_with_parent()
    shutdown.enable_stack_dumps()
    budget.announce()
    registry = shutdown.current()
    graceful = server.handle_term  # raises StopIteration: gunicorn's graceful stop
    drain = _budget.drain

    # gunicorn's master only queues a signal in its handler and calls handle_term,
    # handle_int, handle_quit and handle_alrm from its loop: logging here is safe.
    def handle_stop(signum: int) -> None:  # from the master's loop, not in signal context
        if not registry.shutting_down.is_set():
            registry.signal_received(signum)
            if drain > 0:
                logging.getLogger("shutdown").info(
                    "draining for %.1f s: serving on, /readyz says 503", drain)
                server.kill_workers(signal.SIGTERM)  # they drain too (PID 1 gets the only signal)
                signal.signal(signal.SIGALRM, server.signal)  # queued like any signal: handle_alrm
                signal.setitimer(signal.ITIMER_REAL, drain)
                return
        elif drain > 0 and signum == signal.SIGTERM and signal.getitimer(signal.ITIMER_REAL)[0] > 0:
            return  # a repeat during the drain; SIGINT or SIGQUIT end it
        graceful()

    server.handle_term = lambda: handle_stop(signal.SIGTERM)
    server.handle_int = lambda: handle_stop(signal.SIGINT)  # not gunicorn's quick stop (500s)
    server.handle_quit = lambda: handle_stop(signal.SIGQUIT)  # likewise
    server.handle_alrm = graceful  # the drain is over


def pre_fork(server, worker):
    """Master, before each fork: share the app's modules with the workers (memory)."""
    forks.share_with_forks(*SHARED_MODULES)


def post_fork(server, worker):
    """Worker, just forked: never use a connection the master opened."""
    logs.set_role("web.worker")
    shutdown.enable_stack_dumps()
    db.after_fork()
    worker.drain_seconds = _budget.drain


def post_worker_init(worker):
    """Worker, app loaded: stop signals recorded (and logged by a thread), Celery's pools closed at exit.

    The worker class (app/web_worker.py) makes SIGINT and SIGQUIT as graceful as SIGTERM.
    """
    from core import broker

    registry = shutdown.current()
    registry.register("celery broker connections", broker.close_celery_connections)
    record = shutdown.report_signals(registry)  # handlers only record; a thread logs
    for signum in shutdown.STOP_SIGNALS:
        shutdown.chain_signal(signum, record)
        signal.siginterrupt(signum, False)  # as gunicorn: let the request's I/O finish


def worker_exit(server, worker):
    """Worker, leaving its loop after the requests in flight: close its connections.

    Then exit at once: everything this worker opened is closed by now, and
    tearing down an interpreter with Flask, Celery and SQLAlchemy loaded
    takes 0.15 s alone and half a second with the whole set stopping on two
    cores, which only delays the master. The exit code is gunicorn's own
    (the SystemExit on its way out). gunicorn also calls this hook in the
    master for a worker that vanished; the master has nothing to do then.
    """
    if os.getpid() != worker.pid:
        return
    shutdown.current().close_all(budget=CLOSE_BUDGET)
    leaving = sys.exc_info()[1]
    if isinstance(leaving, SystemExit):
        code = leaving.code if isinstance(leaving.code, int) else int(leaving.code is not None)
        logging.shutdown()  # flush the log handlers: os._exit skips atexit
        sys.stdout.flush()
        os._exit(code)


def on_exit(server):
    """Master, last thing before exit."""
    shutdown.current().close_all(budget=CLOSE_BUDGET)
