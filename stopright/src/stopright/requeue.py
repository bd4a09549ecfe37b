"""Requeues the broker refused: a task handed back while the broker was down runs once it is back.

A task handed back at a stop is rejected with requeue (stopright/handback.py).
With the broker down at that moment the reject fails: kombu logged ``Couldn't
reject ..., reason: network:ConnectionError`` at CRITICAL with a traceback,
and on Redis the message stayed in the broker's ``unacked`` hash under its
delivery tag, restored only once older than kombu's ``visibility_timeout``
(1 h by default). The demo's ledger sweeper takes such a job back after
its lease; an app without a ledger waits the hour.

Here, in the worker's MainProcess:

* :class:`Request` (``HandBackTask.Request``) hands the reject a reporter in
  place of Celery's logger: a refused requeue is one WARNING line saying what
  happens next, and on Redis its delivery tag goes to a spool file;
* :class:`RestoreRefused`, a consumer bootstep (``install`` adds it), runs
  each time the worker connects to the broker (its start, every reconnection)
  and moves each spooled tag's message from ``unacked`` back to its queue with
  kombu's own ``QoS.restore_by_tag``: one WATCH/MULTI transaction, so the
  message is requeued once, or not at all when kombu's visibility timeout or
  another worker restored it first. Then the tag is forgotten.
* RabbitMQ needs none of it: a reject fails there only when the connection is
  gone, and RabbitMQ requeues the unacked messages of a closed connection
  itself.

The spool must outlive the worker: ``STOPRIGHT_SPOOL_DIR``, else
``$XDG_STATE_HOME/stopright``, else ``~/.local/state/stopright``. A container
that is replaced starts with an empty disk: mount a volume there, or such a
message comes back only after ``visibility_timeout``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.worker.request import Request as CeleryRequest
from celery.worker.request import logger as celery_request_logger

from stopright.upstream import kombu as kombu_internals

log = logging.getLogger("stopright.requeue")

SPOOL_ENV = "STOPRIGHT_SPOOL_DIR"
SPOOL_NAME = "refused-requeues.jsonl"


def spool_path() -> Path:
    """Where the delivery tags of refused requeues wait for the broker (see above)."""
    directory = os.environ.get(SPOOL_ENV)
    if not directory:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        directory = os.path.join(state, "stopright")
    return Path(directory) / SPOOL_NAME


class Request(CeleryRequest):
    """Celery's Request; a requeue the broker refuses is reported in one line and done once it is back."""

    on_reject: Any  # Celery's: kombu's message.reject, or what it is given instead

    def reject(self, requeue: bool = False) -> None:
        if requeue and not self.acknowledged:
            self.on_reject = _ReportingTo(self.on_reject, _RefusedRequeue(self))
        super().reject(requeue)


class _ReportingTo:
    """Celery's reject callback, given our reporter as the logger kombu reports a failed reject to."""

    def __init__(self, reject: Callable[..., Any], reporter: _RefusedRequeue) -> None:
        self._reject = reject
        self._reporter = reporter

    def __call__(self, _logger: Any, errors: tuple[type[BaseException], ...], requeue: bool) -> Any:
        return self._reject(self._reporter, errors, requeue)


class _RefusedRequeue:
    """What kombu's ``reject_log_error`` reports to: a refused requeue, spooled (Redis), told in one line."""

    def __init__(self, request: CeleryRequest) -> None:
        self._task = f"{request.name}[{request.id}]"
        self._app = request.app

    def critical(self, _message: str, tag: Any = None, error: Any = None, *_: Any, **__: Any) -> None:
        try:
            kind, broker = _broker(self._app)
            if kind == "redis" and tag is not None:
                path = _spool(broker, str(tag), self._task)
                then = f"it is requeued when the worker next connects to the broker (spooled in {path})"
            elif kind == "amqp":
                then = "RabbitMQ requeues the unacked messages of a closed connection itself"
            else:
                then = "the broker keeps it as unacknowledged"
        except Exception as exc:  # noqa: BLE001 - a report must never fail the stop
            then = (f"it could not be spooled ({type(exc).__name__}: {exc}): it comes back only after "
                    "the broker's visibility timeout")
        log.warning("task %s: requeue refused by the broker (%s: %s); %s",
                    self._task, type(error).__name__, error, then)

    def __getattr__(self, name: str) -> Any:  # any other report: as Celery would log it
        return getattr(celery_request_logger, name)


def _broker(app: Any) -> tuple[str, str]:
    """The broker's kind (``redis``, ``amqp``, ...) and its URL, password masked: the spool's key."""
    conn = app.connection_for_write()
    try:
        return conn.transport.driver_type, conn.as_uri()
    finally:
        conn.release()


class Spool:
    """A small JSON-lines file shared by processes: its entries read and changed under an exclusive lock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, entry: dict[str, Any]) -> None:
        with self.locked() as entries:
            entries.append(entry)

    @contextlib.contextmanager
    def locked(self) -> Iterator[list[dict[str, Any]]]:
        """The entries, locked; the list as the caller leaves it is written back (also on an error)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as spool:
            fcntl.flock(spool, fcntl.LOCK_EX)
            spool.seek(0)
            entries = [json.loads(line) for line in spool if line.strip()]
            before = list(entries)
            try:
                yield entries
            finally:
                if entries != before:
                    spool.seek(0)
                    spool.truncate()
                    spool.writelines(json.dumps(entry) + "\n" for entry in entries)
                    spool.flush()


def _spool(broker: str, tag: str, task: str) -> Path:
    spool = Spool(spool_path())
    spool.add({"broker": broker, "tag": tag, "task": task, "at": time.time()})
    return spool.path


def restore(app: Any) -> int:
    """Requeue this broker's spooled refused requeues that are still unacknowledged; how many tags were done.

    kombu's ``restore_by_tag`` on a tag no longer in ``unacked`` (restored
    or acknowledged since) changes nothing. A tag whose restore fails (the
    broker gone again) stays for the next connection.
    """
    if not spool_path().exists():
        return 0
    conn = app.connection_for_write()
    try:
        if conn.transport.driver_type != "redis":
            return 0
        broker = conn.as_uri()
        with Spool(spool_path()).locked() as entries:
            mine = [entry for entry in entries if entry.get("broker") == broker]
            if not mine:
                return 0
            channel = conn.channel()
            try:
                for entry in mine:
                    kombu_internals.restore_unacked(channel, entry["tag"])
                    entries.remove(entry)
                    log.warning("requeued task %s, whose requeue the broker had refused", entry.get("task"))
            finally:
                channel.close()
        return len(mine)
    finally:
        conn.release()


class RestoreRefused(bootsteps.StartStopStep):
    """Consumer bootstep: at each connection to the broker, requeue what it refused (:func:`restore`)."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        try:
            restore(c.app)
        except Exception as exc:  # noqa: BLE001 - never stop the consumer; the next connection tries again
            log.warning("spooled requeues not restored yet (%s: %s); the next connection tries again",
                        type(exc).__name__, exc)
