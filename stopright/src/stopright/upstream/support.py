"""The supported versions, and each part of stopright checked before it is applied.

A part (:data:`PARTS`) is what falls back on its own: the worker's bounded
stop, the consumer, beat's handler, ... Before applying one, ``install()`` and
the gunicorn hooks ask :func:`applies`: the versions of the libraries it
reaches into must be in :data:`SUPPORTED` (stopright/pyproject.toml declares
the same ranges) and its cheap shape checks (stopright/upstream/checks_*.py:
digests of the copied methods, signatures, attributes, call sites) must pass.
Otherwise the part keeps the library's stock behaviour and one warning says
what was not applied and why. Never raises: a check that breaks is a mismatch.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("stopright")

#: Per library: the oldest version whose shapes all pass, and the first one not supported.
#: Celery, kombu and billiard: below their next minor (stopright copies their methods, pinned by
#: digest, and a minor release changes them); gunicorn: below its next minor (its patch releases
#: already change the gthread worker stopright overrides); psutil: public API only, next major.
SUPPORTED: dict[str, tuple[str, str]] = {
    "celery": ("5.7.0", "5.8"),
    "kombu": ("5.7.0", "5.8"),
    "billiard": ("4.3.2", "4.4"),
    "gunicorn": ("27.0.1", "27.1"),
    "psutil": ("6.0.0", "8"),
}


@dataclass(frozen=True)
class Part:
    """What stopright applies (``applies``), what stays if it does not (``stock``), and its checks."""

    applies: str
    stock: str
    libraries: tuple[str, ...]
    check: Callable[[], None]  # raises (stopright.upstream.shapes.ShapeChanged) on a changed shape


def _lazy(module: str, name: str) -> Callable[[], None]:
    """The check ``name`` of ``stopright.upstream.<module>``, imported when the part is first asked about."""
    def check() -> None:
        getattr(importlib.import_module(f"stopright.upstream.{module}"), name)()
    return check


PARTS: dict[str, Part] = {
    "worker stop": Part(
        "the worker's bounded stop (stop signals, stopright's version of the pool, the hand-back)",
        "Celery's own stop signals and pool (warm shutdown without a time limit, cold on a second signal)",
        ("celery", "billiard", "psutil"), _lazy("checks_celery", "worker_stop")),
    "remote shutdown": Part(
        "the bounded 'celery control shutdown' command", "Celery's own shutdown command",
        ("celery", "kombu"), _lazy("checks_celery", "remote_shutdown")),
    "consumer": Part(
        "stopright's consumer (woken by stop signals, quick reconnects, hand-back on connection loss)",
        "Celery's consumer (worker_consumer is left as it is)",
        ("celery", "kombu"), _lazy("checks_celery", "consumer")),
    "beat": Part(
        "beat's stop (no sync handler of Celery's, stopright's scheduler that closes connections)",
        "Celery's beat handlers and scheduler", ("celery",), _lazy("checks_celery", "beat")),
    "broker connections": Part(
        "the close of kombu's pooled connections at exit, with the protocol's handshake; forks forget them",
        "kombu's pooled connections left to the process's exit (and kombu's own reset in forks)",
        ("celery", "kombu"), _lazy("checks_kombu", "pools")),
    "requeue": Part(
        "the requeue of a hand-back the broker refused, once it is back",
        "Celery's reject (a refused requeue is logged and the message waits for the broker's own restore)",
        ("celery", "kombu"), _lazy("checks_kombu", "requeue")),
    "gunicorn master": Part(
        "gunicorn's master stop (SIGINT and SIGQUIT graceful, the drain, inherited sockets)",
        "gunicorn's own master signals (SIGINT and SIGQUIT its quick stop)",
        ("gunicorn",), _lazy("checks_gunicorn", "master")),
    "gunicorn workers": Part(
        "stopright's gunicorn worker classes (every stop signal graceful, Connection: close while stopping)",
        "gunicorn's own worker class (gthread or sync) and its exit", ("gunicorn",),
        _lazy("checks_gunicorn", "workers")),
}

_decided: dict[str, bool] = {}


def release(version: str) -> tuple[int, ...]:
    """``5.7.0rc1`` -> (5, 7, 0): the numeric release, enough to compare with :data:`SUPPORTED`."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in match.group(0).split(".")) if match else ()


def version_problem(library: str) -> str | None:
    """Why ``library``'s installed version is not supported, or None."""
    low, high = SUPPORTED[library]
    try:
        version = importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return f"{library} is not installed"
    if not release(low) <= release(version) < release(high):
        return f"{library} {version} is outside the supported range >={low},<{high}"
    return None


def problem(name: str) -> str | None:
    """Why the part ``name`` cannot be applied here (a version, a changed shape), or None."""
    part = PARTS[name]
    for library in part.libraries:
        why = version_problem(library)
        if why:
            return why
    try:
        part.check()
    except Exception as changed:  # noqa: BLE001 - a shape check that breaks is a changed shape too
        return str(changed) or type(changed).__name__
    return None


def applies(name: str) -> bool:
    """Whether stopright applies the part ``name`` in this process; decided once, with one warning if not."""
    if name not in _decided:
        why = problem(name)
        _decided[name] = why is None
        if why is not None:
            part = PARTS[name]
            log.warning("stopright: not applied: %s; kept: %s. Why: %s", part.applies, part.stock, why)
    return _decided[name]
