"""gunicorn for the web process: the demo's settings, and stopright's stop.

Every stop signal (SIGTERM, SIGINT, SIGQUIT) is graceful, after the drain
(``SHUTDOWN_DRAIN_SECONDS``): stopright/gunicorn_hooks.py says what each
does. The hooks below are stopright's, plus what this app opens itself (the
database, after fork) and its memory sharing.
"""

from core import db, forks, logs
from core.config import get_settings
from stopright import gunicorn_hooks as stopright

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
# connection and closes idle kept-alive ones at once (stopright/upstream/gunicorn.py).
worker_class = {"gthread": stopright.THREAD_WORKER, "sync": stopright.SYNC_WORKER}[_settings.web_worker_class]
threads = _settings.web_threads if _settings.web_worker_class == "gthread" else 1  # >1: sync is gthread
proc_name = "web"
preload_app = False  # the master opens no connection; each worker opens its own
control_socket_disable = True  # no extra master thread and socket to stop

# Loaded by every worker (most of them lazily, on the first request): imported
# once in the master instead, so the workers share the pages (forks.share_with_forks).
SHARED_MODULES = ("flask", "sqlalchemy.dialects.sqlite", "app.api", "core.celery_app", "celery.app.task",
                  "celery.canvas", "celery.result", "celery.loaders.app", "kombu.transport.redis")

# -- shutdown (stopright) ----------------------------------------------------
keepalive = 2
worker_exit = stopright.worker_exit  # close this worker's connections, atexit handlers, leave
on_exit = stopright.on_exit  # the master's, last

# -- logging ---------------------------------------------------------------
logconfig_dict = logs.logging_config()  # LOG_LEVEL, validated above by get_settings()


def on_starting(server):
    """Master: every stop signal graceful, after the drain; stop if the manager dies."""
    stopright.on_starting(server)


def pre_fork(server, worker):
    """Master, before each fork: share the app's modules with the workers (memory)."""
    forks.share_with_forks(*SHARED_MODULES)


def post_fork(server, worker):
    """Worker, just forked: never use a connection the master opened."""
    logs.set_role("web.worker")
    stopright.post_fork(server, worker)
    db.after_fork()


def post_worker_init(worker):
    """Worker, app loaded: stop signals recorded (a thread logs them); Celery's pools closed at exit."""
    stopright.post_worker_init(worker)
