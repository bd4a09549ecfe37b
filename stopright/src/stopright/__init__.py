"""stopright: a Flask + Celery process set that stops right, for any app.

The public API, all a user's app needs (README, "Use it in your own app"):

Celery (the module ``celery --app`` loads)::

    celery_app = Celery(..., task_cls=stopright.HandBackTask)
    stopright.install(celery_app)      # grace=..., on_hand_back=...

gunicorn (``gunicorn.conf.py``, or with none: ``gunicorn --config python:stopright.gunicorn_hooks``)::

    from stopright.gunicorn_hooks import *  # noqa: F403

Any process, for what it opened (``forks=True``: and each child it forks, for its own)::

    stopright.register("database pool", engine.dispose)

A broker or database in the same Procfile, kept up until its clients have gone::

    redis: python -m stopright.outlive -- redis-server --port $REDIS_PORT

examples/foreign is the stock reference app (tools/bench/reference) with these lines.

Nothing here imports the demo (app/, core/, jobs/, tasks/, broker/).
Every reach into Celery's, billiard's, kombu's and gunicorn's internals is
in stopright/upstream/, one module per library, each checked by a test.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The release (CHANGELOG.md); the distribution's metadata reads it from here when it is built.
__version__ = "0.1.1"

# Loaded on first use (PEP 562): a light process (the demo's broker watcher) imports
# stopright.registry or stopright.signals without loading Celery or gunicorn.
_EXPORTS = {
    "install": ("stopright.celery_app", "install"),
    "HandBack": ("stopright.handback", "HandBack"),
    "HandBackTask": ("stopright.handback", "HandBackTask"),
    "interruptible": ("stopright.handback", "interruptible"),
    "stop_run": ("stopright.handback", "stop_run"),
    "ShutdownRegistry": ("stopright.registry", "ShutdownRegistry"),
    "register": ("stopright.registry", "register"),
    "shutdown_registry": ("stopright.registry", "current"),
    "StopBudget": ("stopright.budget", "StopBudget"),
    "stop_budget": ("stopright.budget", "current"),
    "StopRightBeat": ("stopright.celery_beat", "StopRightBeat"),
    "STOP_SIGNALS": ("stopright.signals", "STOP_SIGNALS"),
    "exit_on_stop_signals": ("stopright.signals", "exit_on_stop_signals"),
    "stop_with_parent": ("stopright.signals", "stop_with_parent"),
}
# A literal list (the keys above, sorted: tests/unit/test_types.py): type checkers read no other kind.
__all__ = [
    "HandBack", "HandBackTask", "STOP_SIGNALS", "ShutdownRegistry", "StopBudget", "StopRightBeat",
    "exit_on_stop_signals", "install", "interruptible", "register", "shutdown_registry",
    "stop_budget", "stop_run", "stop_with_parent",
]

if TYPE_CHECKING:  # the same names, for type checkers (they do not run __getattr__); nothing at run time
    from stopright.budget import StopBudget
    from stopright.budget import current as stop_budget
    from stopright.celery_app import install
    from stopright.celery_beat import StopRightBeat
    from stopright.handback import HandBack, HandBackTask, interruptible, stop_run
    from stopright.registry import ShutdownRegistry, register
    from stopright.registry import current as shutdown_registry
    from stopright.signals import STOP_SIGNALS, exit_on_stop_signals, stop_with_parent


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'stopright' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attribute)
