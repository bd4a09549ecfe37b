"""How long each process's stop may take, checked against the process manager's SIGKILL.

Two settings, from the environment (or :func:`configure`), read by every process:

  web     ``SHUTDOWN_DRAIN_SECONDS`` (default 0) of serving on after the stop
          signal (``/readyz`` 503, so a load balancer stops routing), then
          the requests in flight: about :data:`WEB_AFTER_DRAIN`.
  worker  ``SHUTDOWN_GRACE_SECONDS`` (default 3) for running tasks, then at
          most :data:`WORKER_AFTER_GRACE` to hand back what still runs, let
          the pool exit and close (stopright/worker_stop.py, phase by phase).
  beat    well under a second.

Where the manager is known from the environment, its SIGKILL window is known
too, and a budget that does not fit is cut down to fit, with a warning at
start: a job still running when the shorter grace ends is handed back to the
queue, where a SIGKILL would leave it ``running`` until its lease expires.

  honcho (``HONCHO_PROCESS_NAME``)  SIGKILL to everything 5 s after the
      *first* process exits, and beat exits within a few hundred ms:
      every stop must fit in 5 s (grace <= 3, drain <= 4). One container
      with honcho as PID 1 is this case too, whatever the platform's grace.
  Heroku (``DYNO``)  SIGKILL 30 s after SIGTERM.
  foreman (``PS``)  SIGKILL ``-t`` seconds (default 5) after SIGTERM; ``-t``
      cannot be seen from here, so only a warning.

systemd, supervisord and Kubernetes take their timeout from their own
configuration: the templates in deploy/ derive it from this budget.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from stopright import signals

log = logging.getLogger("stopright")

#: After the grace, the worker's hand-back (0.5 s), pool exit (0.5 s) and close (1 s).
WORKER_AFTER_GRACE = 2.0
#: After the drain, what the web process needs to answer what is in flight and close.
WEB_AFTER_DRAIN = 1.0
HONCHO_KILL_WAIT = 5.0
HEROKU_KILL_WAIT = 30.0
FOREMAN_KILL_WAIT = 5.0
DEFAULT_GRACE_SECONDS = 3.0
DEFAULT_DRAIN_SECONDS = 0.0
#: The largest grace or drain accepted: an hour.
MAX_SECONDS = 3600.0


@dataclass(frozen=True)
class Manager:
    name: str
    kill_after: float  # seconds from the stop (honcho: from the first exit) to SIGKILL
    enforce: bool  # the window is certain: cut the budget to fit; else only warn


@dataclass(frozen=True)
class StopBudget:
    grace: float
    drain: float
    manager: Manager | None
    warnings: tuple[str, ...] = ()

    @property
    def stop_timeout(self) -> float:
        """What a manager's stop timeout must exceed for this set to stop unkilled."""
        return max(self.grace + WORKER_AFTER_GRACE, self.drain + WEB_AFTER_DRAIN)


def detect_manager(environ: Mapping[str, str], manager_command: str) -> Manager | None:
    """The process manager that started us, where the environment and the manager's
    command line both say so.

    The variables alone are not enough: ``honcho export`` writes
    ``HONCHO_PROCESS_NAME`` and foreman's exports ``PS`` into configurations
    that supervisord or systemd run, with their own timeouts.
    """
    if environ.get("DYNO"):
        return Manager("Heroku", HEROKU_KILL_WAIT, enforce=True)
    if environ.get("HONCHO_PROCESS_NAME") and "honcho" in manager_command:
        return Manager("honcho", HONCHO_KILL_WAIT, enforce=True)
    if environ.get("PS") and "foreman" in manager_command:
        return Manager("foreman", FOREMAN_KILL_WAIT, enforce=False)
    return None


def fit(grace: float, drain: float, environ: Mapping[str, str], manager_command: str = "") -> StopBudget:
    """The grace and drain this process uses, cut to fit a known manager's SIGKILL."""
    manager = detect_manager(environ, manager_command)
    if manager is None:
        return StopBudget(grace, drain, None)
    warnings = []
    max_grace = manager.kill_after - WORKER_AFTER_GRACE
    max_drain = manager.kill_after - WEB_AFTER_DRAIN
    for name, value, limit in (("SHUTDOWN_GRACE_SECONDS", grace, max_grace),
                               ("SHUTDOWN_DRAIN_SECONDS", drain, max_drain)):
        if value <= limit:
            continue
        if manager.enforce:
            warnings.append(f"{name}={value:g} does not fit {manager.name}'s SIGKILL "
                            f"{manager.kill_after:g} s into a stop: using {limit:g} s")
        else:
            warnings.append(f"{name}={value:g} does not fit {manager.name}'s default SIGKILL "
                            f"{manager.kill_after:g} s into a stop: run it with -t {value + 3:g} or more")
    if manager.enforce:
        grace, drain = min(grace, max_grace), min(drain, max_drain)
    return StopBudget(grace, drain, manager, tuple(warnings))


_configured: dict[str, float] = {}


def configure(*, grace: float | None = None, drain: float | None = None) -> None:
    """Set the grace or the drain from code, before the process's first :func:`current`.

    Unset, each comes from the environment (``SHUTDOWN_GRACE_SECONDS``,
    ``SHUTDOWN_DRAIN_SECONDS``) or its default (3 s, 0 s).
    """
    for name, value in (("grace", grace), ("drain", drain)):
        if value is not None:
            _configured[name] = _checked(name.upper(), value, low=0.0 if name == "drain" else None)
    current.cache_clear()


def _checked(name: str, value: object, *, low: float | None) -> float:
    """A number of seconds in range, or ValueError naming the setting."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"invalid settings: {name}={value!r}: not a number of seconds") from None
    if not (seconds >= low if low is not None else seconds > 0) or seconds > MAX_SECONDS:
        bound = "0 or more" if low is not None else "more than 0"
        raise ValueError(f"invalid settings: {name}={value!r}: must be {bound} and at most {MAX_SECONDS:g}")
    return seconds


def _setting(name: str, env: str, default: float, *, low: float | None) -> float:
    if name in _configured:
        return _configured[name]
    raw = os.environ.get(env)
    return default if raw is None or raw.strip() == "" else _checked(env, raw, low=low)


@functools.cache
def current() -> StopBudget:
    """This process's stop budget (settings, environment and manager read once)."""
    grace = _setting("grace", "SHUTDOWN_GRACE_SECONDS", DEFAULT_GRACE_SECONDS, low=None)
    drain = _setting("drain", "SHUTDOWN_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS, low=0.0)
    return fit(grace, drain, os.environ, signals.manager_command())


def announce() -> StopBudget:
    """Log the budget's warnings; call once at start, once logging is set up."""
    budget = current()
    for warning in budget.warnings:
        log.warning("%s", warning)
    if budget.manager is not None and budget.manager.name == "honcho" and budget.warnings:
        log.warning("for a longer grace, run each entry under its own manager (deploy/, docs/deploying.md), "
                    "not honcho")
    return budget
