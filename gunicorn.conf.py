"""gunicorn for the web process: settings, then lifecycle hooks.

Stop signals and what they do here:
  SIGTERM (honcho, systemd, Heroku; to the master *and* workers at once):
      graceful. Workers finish the requests in flight (long polls answer at
      once with the job's current state), then ``worker_exit`` closes their
      connections; the master waits ``graceful_timeout`` at most.
  SIGINT (Ctrl+C of ``gunicorn`` run directly; the tty sends it to every
      process): stock gunicorn does a quick shutdown and its workers answer
      requests in flight with HTTP 500. Here SIGINT is made graceful too, in
      the master (``on_starting``) and in each worker (``post_worker_init``).
  SIGQUIT: left as gunicorn's quick shutdown, the explicit "now" signal.
"""

import logging
import math
import os
import signal
import sys

import app
from app import db, logs, shutdown
from app.config import get_settings

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
# once in the master instead, so the workers share the pages (app.share_with_forks).
SHARED_MODULES = ("flask", "sqlalchemy.dialects.sqlite", "app.api", "tasks.jobs", "celery.app.task",
                  "celery.canvas", "celery.result", "celery.loaders.app", "kombu.transport.redis")

# -- shutdown --------------------------------------------------------------
graceful_timeout = math.ceil(_settings.shutdown_grace_seconds)  # budget shared with the worker
keepalive = 2
CLOSE_BUDGET = 1.0  # for the registry at exit: every connection closed, or given up, within it

# -- logging ---------------------------------------------------------------
logconfig_dict = logs.LOGGING


def on_starting(server):
    """Master: make SIGINT graceful; log the stop signal; stop if honcho dies."""
    shutdown.stop_with_parent()
    shutdown.enable_stack_dumps()
    registry = shutdown.current()
    graceful = server.handle_term

    def handle_term():
        registry.signal_received(signal.SIGTERM)
        graceful()

    def handle_int():
        registry.signal_received(signal.SIGINT)
        graceful()  # not gunicorn's quick stop: requests in flight would get 500

    server.handle_term = handle_term
    server.handle_int = handle_int


def pre_fork(server, worker):
    """Master, before each fork: share the app's modules with the workers (memory)."""
    app.share_with_forks(*SHARED_MODULES)


def post_fork(server, worker):
    """Worker, just forked: never use a connection the master opened."""
    logs.set_role("web.worker")
    shutdown.enable_stack_dumps()
    db.after_fork()


def post_worker_init(worker):
    """Worker, app loaded: graceful SIGINT, logged signals, Celery's pools closed at exit."""
    from app import broker

    registry = shutdown.current()
    registry.register("celery broker connections", broker.close_celery_connections)
    # The same graceful exit for a terminal's SIGINT as for SIGTERM.
    signal.signal(signal.SIGINT, worker.handle_exit)
    for signum in (signal.SIGTERM, signal.SIGINT):
        shutdown.chain_signal(signum, registry.signal_received)
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
