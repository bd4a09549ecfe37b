"""What stopright relies on, checked when the worker or beat starts (``install`` connects these).

A user's app reaches stopright in shapes of its own: the Flask docs' pattern
calls ``config_from_object`` after ``install``, keeps a task base of its own,
registers closers in an app factory that the Celery MainProcess runs before
its pool forks. Each of those either works or is named here at start, with
what to change, instead of showing up as a stop that goes wrong.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps

from stopright import pools, registry, settings
from stopright.handback import HandBackTask

log = logging.getLogger("stopright")


class SettingsAtStart(bootsteps.Step):
    """Worker start, logging set up: a refused pool, or a settings conflict, stops the worker (ValueError).

    A bootstep, not a signal receiver: Celery logs and swallows a receiver's
    exception, and the worker would start with a stop that loses tasks.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        if pools.refusals:  # before any step builds the pool
            raise ValueError(pools.refusals[0])
        settings.raise_conflicts(settings.at_start(parent.app))


def tasks_not_handed_back(app: Celery) -> list[str]:
    """The app's tasks (not Celery's own) whose class is not a HandBackTask: a stop cannot hand them back."""
    return sorted(name for name, task in app.tasks.items()
                  if not name.startswith("celery.") and not isinstance(task, HandBackTask))


def warn_tasks_not_handed_back(app: Celery) -> None:
    names = tasks_not_handed_back(app)
    if names:
        log.warning("these tasks will not be handed back at a stop: %s. Their base is not "
                    "stopright.HandBackTask, so one still running when the grace ends is killed with its "
                    "pool child and requeued, cut wherever it was. Derive their base from it (Celery("
                    "task_cls=...), class MyTask(stopright.HandBackTask), or base=stopright.HandBackTask)",
                    ", ".join(names))


def warn_left_behind_by_pool(forks_children: bool) -> None:
    if forks_children:
        registry.warn_left_behind("worker MainProcess, before its pool forks")


def require_stopright_scheduler(scheduler: object) -> None:
    """Beat start: its scheduler must be stopright's, or beat would stop as stock Celery's does."""
    from stopright.celery_beat import StopRightBeat  # beat only: the worker never loads it

    if not isinstance(scheduler, StopRightBeat):
        cls = type(scheduler)
        raise SystemExit(
            f"stopright: beat runs {cls.__module__}.{cls.__qualname__}, which does not stop right "
            "(schedule saved, connections closed, every stop signal graceful). install() selects "
            "stopright.celery_beat:Scheduler in place of Celery's default; for a scheduler of your own "
            "(beat_scheduler or -S), mix stopright's in first: "
            f"class Scheduler(stopright.StopRightBeat, {cls.__qualname__}).")
