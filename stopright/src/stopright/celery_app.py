"""``install(celery_app, grace=..., on_hand_back=..., keep=...)``: the Celery side in one call.

Called where the app is made, so in every process that imports it: the
worker and beat, but also each web worker that only publishes tasks. Here
only the settings and the signal receivers; the worker's side
(stopright/celery_worker.py: pools, the bounded stop, Celery's internals) is
loaded by the first signal only a worker or beat sends.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from celery import Celery, signals

from stopright import budget, settings
from stopright import signals as stop_signals
from stopright.upstream.support import applies


def install(celery_app: Celery[Any], *, grace: float | None = None,
            on_hand_back: Callable[[Any], object] | None = None, keep: Collection[str] = ()) -> None:
    """Make ``celery_app``'s worker stop right. Call once, in the module the worker loads (``--app``).

    ``grace``: seconds running tasks have to finish once a stop begins
    (default: ``SHUTDOWN_GRACE_SECONDS``, else 3), cut to fit a known
    manager's SIGKILL (stopright/budget.py). ``on_hand_back(request)``: called
    in the MainProcess for a task whose pool child had to be killed because
    it did not hand back in time (its message is requeued anyway), for what
    the task kept elsewhere. For the hand-back itself, give the app
    ``task_cls=stopright.HandBackTask``. ``keep``: Celery settings of
    :data:`stopright.settings.SETTINGS` to leave as they are (logged at start).
    Raises ValueError for a bad argument or ``SHUTDOWN_*`` variable.
    """
    settings.keep_on(celery_app, keep)
    if grace is not None:
        budget.configure(grace=grace)
    budget.current()  # a bad SHUTDOWN_* variable: the error now, not in a signal handler later
    program = settings.program()
    if program in ("worker", "beat"):
        stop_signals.exit_on_stop_signals()  # until the handlers below are in place
        from stopright import celery_worker  # noqa: F401, PLC0415 - now, not in the start-up's signals
    if program == "beat" and applies("beat"):
        from stopright.upstream import celery as celery_internals  # noqa: PLC0415 - beat only

        celery_internals.beat_without_sync_handler(celery_app)
    if celery_app.configured:  # else read nothing yet (reading would load the configuration now)
        settings.apply(celery_app)
    celery_app.on_after_configure.connect(_apply_settings, weak=False, dispatch_uid="stopright.install")
    _options["on_hand_back"] = on_hand_back
    if not _options.get("connected"):
        _options["connected"] = True
        _connect()
    if program != "worker" or applies("requeue"):
        celery_app.steps["consumer"].add("stopright.requeue:RestoreRefused")  # requeues the broker refused
    celery_app.steps["worker"].add("stopright.checks:SettingsAtStart")


def _apply_settings(sender: Celery[Any], **_: object) -> None:
    """stopright's Celery settings, on the app's configuration as loaded now (stopright/settings.py).

    Connected to ``on_after_configure``: ``config_from_object`` after ``install``
    (the Flask docs' ``celery_init_app``) builds the configuration anew and
    would drop what was set here; it is set again on every load.
    """
    settings.apply(sender)


_options: dict[str, Any] = {}  # install()'s, for the worker's side once it is loaded


def _in_worker(name: str) -> Callable[..., None]:
    """A receiver that loads the worker's side when Celery first sends its signal (a worker or beat)."""

    def receiver(*args: Any, **kwargs: Any) -> None:
        from stopright import celery_worker  # noqa: PLC0415 - a worker or beat: now, not in a publisher

        celery_worker.options.update(_options)
        getattr(celery_worker, name)(*args, **kwargs)

    receiver.__name__ = receiver.__qualname__ = f"stopright.celery_worker.{name}"
    return receiver


def _connect() -> None:
    for signal, name in ((signals.celeryd_init, "worker_starting"), (signals.worker_init, "worker_init"),
                         (signals.celeryd_after_setup, "warn_worker"), (signals.beat_init, "check_beat"),
                         (signals.worker_ready, "worker_ready"), (signals.worker_process_init, "child_init"),
                         (signals.worker_process_shutdown, "child_shutdown"),
                         (signals.worker_shutdown, "worker_shutdown")):
        signal.connect(_in_worker(name), weak=False)
