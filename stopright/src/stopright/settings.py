"""The Celery settings ``install`` changes, and what it does with the app's own.

Nothing is changed silently: the worker logs, at start, every setting
stopright set (with the value it replaced), every one it left as it was (an
opt-out, ``install(keep=...)``, or the app's own value), and why each matters
to a stop. Two settings the hand-back cannot work without (:data:`REQUIRED`)
are an error when the app sets them otherwise: the worker does not start.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.app.defaults import DEFAULTS

from stopright.upstream.support import applies

log = logging.getLogger("stopright")

#: Setting: (stopright's value, why a stop needs it).
SETTINGS: dict[str, tuple[Any, str]] = {
    "task_acks_late": (True, "a task cut short by a stop stays unacked, and goes back to the queue"),
    "task_reject_on_worker_lost": (True, "a pool child killed mid-task requeues its message, not FAILURE"),
    "worker_prefetch_multiplier": (1, "no reserved message waits in a stopping worker's memory"),
    # The pool is not set here: whichever -P or worker_pool names is replaced by stopright's version of
    # it when the worker starts (stopright/pools.py), so a -P on the command line never swaps it.
    "worker_consumer": ("stopright.upstream.celery_consumer:Consumer",
                        "the consumer without Celery's fixed sleeps at stop, and the hand-back on a lost "
                        "broker connection"),
    "worker_cancel_long_running_tasks_on_connection_loss": (
        False, "Celery's cancel SIGTERMs pool children (which ignore it) and marks tasks RETRY; "
        "stopright hands them back instead"),
    "worker_soft_shutdown_timeout": (0, "a soft shutdown sleeps its whole timeout; the grace bounds stops"),
    "control_queue_exclusive": (
        False, "a worker reconnecting to RabbitMQ after a network cut found its remote-control queue "
        "still locked by its old connection (RESOURCE_LOCKED) and exited, stopping the set with it"),
}
#: Without these a hand-back is a loss (an early ack) or a failure: another value is an error.
REQUIRED = frozenset({"task_acks_late", "task_reject_on_worker_lost"})
DEFAULT_BEAT_SCHEDULER = "celery.beat:PersistentScheduler"
BEAT_SCHEDULER = "stopright.celery_beat:Scheduler"
KEPT_BY_INSTALL = "install(keep=...)"
NOT_APPLIED = "its part is not applied on these versions (the 'stopright: not applied' warning says why)"
#: Setting: the program it is for, and its part (stopright/upstream/support.py), checked there.
PARTS = {"worker_consumer": ("worker", "consumer"), "beat_scheduler": ("beat", "beat")}


def program() -> str:
    """``worker`` or ``beat`` under ``celery ... worker|beat``; else "" (a web process publishing)."""
    args = sys.argv[1:]
    return next((arg for arg in args if arg in ("worker", "beat")), "") if "celery" in sys.argv[0] else ""


def _not_applied(name: str) -> bool:
    """The setting's part does not fit the installed versions, in the program it is for."""
    runs_in, part = PARTS.get(name, ("", ""))
    return bool(part) and program() == runs_in and not applies(part)


@dataclass
class Outcome:
    """What :func:`apply` did to one configuration: for the start's log lines and its error."""

    changed: list[tuple[str, Any, Any]] = field(default_factory=list)  # (setting, was, now)
    kept: list[tuple[str, Any, str]] = field(default_factory=list)  # (setting, value, why kept)
    conflicts: list[str] = field(default_factory=list)


def check_keep(keep: Collection[str]) -> None:
    """``install(keep=...)``: names stopright sets, none of them one a stop cannot do without."""
    if isinstance(keep, str):
        raise ValueError(f"keep={keep!r}: a collection of setting names, e.g. keep=({keep!r},)")
    unknown = sorted(set(keep) - set(SETTINGS) - {"beat_scheduler"})
    if unknown:
        raise ValueError(f"keep: {', '.join(unknown)}: not a setting stopright changes "
                         f"(those are {', '.join(sorted(SETTINGS))}, beat_scheduler)")
    required = sorted(set(keep) & REQUIRED)
    if required:
        raise ValueError(f"keep: {', '.join(required)} cannot be kept: " + "; ".join(
            f"{name}: {SETTINGS[name][1]}" for name in required))


def _users(app: Celery, name: str, ours: dict[str, Any]) -> tuple[bool, Any]:
    """(True, value) where the app's configuration sets ``name`` itself (not Celery's default, not us)."""
    conf = app.conf
    for source in conf.maps[:-1]:  # the changes, then each config source; the defaults come last
        try:
            value = source[name]
        except KeyError:
            continue
        if source is conf.changes and name in ours and ours[name] == value:
            continue  # what stopright set there
        return True, value
    return False, None


_kept: dict[int, frozenset[str]] = {}  # id(app): install(keep=...)
_ours: dict[int, dict[str, Any]] = {}  # id(app): what stopright set (a reload must not take it for the app's)


def keep_on(app: Celery, keep: Collection[str]) -> None:
    """``install(app, keep=...)``: checked, and remembered for every load of ``app``'s configuration."""
    check_keep(keep)
    _kept[id(app)] = frozenset(keep)


def apply(app: Celery) -> Outcome:
    """Set :data:`SETTINGS` on ``app``'s loaded configuration, but those kept or set by the app.

    Reads the configuration: call only once it is loaded.
    """
    app.conf.get("task_acks_late")  # loads the configuration (if not yet): app.conf is the loaded one now
    keep = _kept.get(id(app), frozenset())
    ours = _ours.setdefault(id(app), {})
    outcome = Outcome()
    for name, (value, why) in SETTINGS.items():
        set_by_app, theirs = _users(app, name, ours)
        if name in keep:
            outcome.kept.append((name, app.conf.get(name), KEPT_BY_INSTALL))
        elif _not_applied(name):
            outcome.kept.append((name, app.conf.get(name), NOT_APPLIED))
        elif not set_by_app or theirs == value:
            was = DEFAULTS.get(name, app.conf.get(name)) if not set_by_app else theirs
            app.conf[name] = ours[name] = value
            if was != value:
                outcome.changed.append((name, was, value))
        elif name in REQUIRED:
            outcome.conflicts.append(f"{name}={theirs!r} (the app's; stopright needs {value!r}: {why})")
        else:
            outcome.kept.append((name, theirs, f"the app's own (stopright would set {value!r}: {why})"))
    if "beat_scheduler" in keep:
        outcome.kept.append(("beat_scheduler", app.conf.beat_scheduler, KEPT_BY_INSTALL))
    elif _not_applied("beat_scheduler"):
        outcome.kept.append(("beat_scheduler", app.conf.beat_scheduler, NOT_APPLIED))
    elif app.conf.beat_scheduler in (DEFAULT_BEAT_SCHEDULER, ours.get("beat_scheduler")):
        app.conf.beat_scheduler = ours["beat_scheduler"] = BEAT_SCHEDULER
        outcome.changed.append(("beat_scheduler", DEFAULT_BEAT_SCHEDULER, BEAT_SCHEDULER))
    return outcome


def report(outcome: Outcome) -> None:
    """Worker or beat start, logging set up: one line for what changed, one per setting left alone."""
    if outcome.changed:
        log.info("Celery settings set by stopright: %s",
                 ", ".join(f"{name}={now!r} (was {was!r})" for name, was, now in outcome.changed))
    for name, value, why in outcome.kept:
        level = logging.INFO if why in (KEPT_BY_INSTALL, NOT_APPLIED) else logging.WARNING
        log.log(level, "Celery setting %s=%r left as it is: %s", name, value, why)


def at_start(app: Celery) -> Outcome:
    """Worker or beat start, logging set up: apply once more (a change after the load), log what was done."""
    outcome = apply(app)
    report(outcome)
    return outcome


def raise_conflicts(outcome: Outcome) -> None:
    """Worker start: a setting the hand-back cannot do without, set otherwise by the app, stops it here."""
    if outcome.conflicts:
        raise ValueError("stopright: Celery settings conflict with a stop that loses nothing: "
                         + "; ".join(outcome.conflicts) + ". Remove them from the app's configuration.")
