"""A user's Flask + Celery app written against stopright's whole public API, as its READMEs show it.

Never run: tests/unit/test_types.py checks it with ``mypy --strict``, so a name or a signature of
the API that type checkers cannot see, or that changed, fails there.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.beat import PersistentScheduler
from flask import Flask

import stopright

_db: sqlite3.Connection | None = None


def create_app() -> Flask:
    """The Flask docs' pattern: each process that builds the app registers what it opened."""
    global _db
    app = Flask(__name__)
    _db = sqlite3.connect(":memory:", check_same_thread=False)
    stopright.register("database", _db.close, timeout=1.0, forks=True)
    celery_init_app(app)
    return app


def celery_init_app(app: Flask) -> Celery[Any]:  # [Any]: also right for a user with celery-types
    class FlaskTask(stopright.HandBackTask):  # its own __call__ is wrapped: a stop still hands it back
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    stopright.install(celery_app, grace=5.0, on_hand_back=_forget, keep={"worker_prefetch_multiplier"})
    app.extensions["celery"] = celery_app
    return celery_app


def _forget(request: Any) -> None:
    """A task whose pool child was killed: its message is requeued anyway; drop what it kept here."""
    print("handed back:", request.id)


class Report(stopright.HandBackTask):
    """Only its interruptible sections may be cut short; runs on through a lost broker connection."""

    name = "user_app.report"
    interrupt_anywhere = False
    hand_back_on_connection_loss = False

    def run(self, rows: int) -> int:
        done = 0
        for _ in range(rows):
            with stopright.interruptible():
                done += 1
        return done


class Scheduler(stopright.StopRightBeat, PersistentScheduler):  # type: ignore[misc]  # Celery's class: untyped
    """A beat scheduler of the user's own (``beat_scheduler``), with stopright's stop mixed in first."""

    close_budget = 1.0


class Watchdog:
    """A helper thread of the task's pool child that can stop the run, as the hand-back does."""

    def __init__(self) -> None:
        self.stopped = threading.Event()

    def fire(self) -> bool:
        return stopright.stop_run(stopright.HandBack)


@contextmanager
def handed_back_noted() -> Iterator[None]:
    try:
        yield
    except stopright.HandBack:
        print("handed back at a stop")
        raise


def own_program() -> None:
    """A program of the user's own in the same process set: exits on a stop, closes what it opened."""
    stopright.exit_on_stop_signals()
    stopright.stop_with_parent()
    registry: stopright.ShutdownRegistry = stopright.shutdown_registry()
    registry.register("socket", lambda: None, timeout=0.5)
    budget: stopright.StopBudget = stopright.stop_budget()
    seconds: float = budget.grace + budget.drain
    signals: tuple[int, ...] = tuple(stopright.STOP_SIGNALS)
    print(seconds, signals, stopright.__version__)
