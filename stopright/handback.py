"""The hand-back protocol, inside a pool child: a task that outlives the grace goes back to the queue.

The worker's MainProcess (stopright/worker_stop.py) sends :data:`HANDBACK_SIGNAL`
(SIGUSR2) to each pool child still running a task when the grace is used up.
Here, in the child, that signal raises :class:`HandBack` inside the task's
code; :class:`HandBackTask` turns it into ``Reject(requeue=True)``, so the
message (acknowledged late) goes back to the queue and another worker runs
the task from the start. Tasks must therefore be idempotent, as Celery's
``acks_late`` already asks.

Where a task must not be interrupted (the middle of a database write), set
``interrupt_anywhere = False`` on it and mark the parts that may be cut
with :func:`interruptible`: a signal that lands elsewhere waits for the next
such section. :func:`stop_run` raises an exception of the caller's choice
in the running task from another thread (the demo's lease keeper stops a
run the sweeper took back this way).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from celery import Task
from celery.exceptions import Reject

log = logging.getLogger("shutdown")

#: Sent by the worker's MainProcess to a pool child whose task must hand back now.
HANDBACK_SIGNAL = signal.SIGUSR2
#: The reason of the ``Reject`` a hand-back raises.
HANDED_BACK = "handed back by shutdown"


class HandBack(BaseException):
    """Raised inside a running task when the worker's grace is used up.

    A BaseException, so task code catching ``Exception`` cannot swallow it.
    """


class _Run:
    """The task run of this pool child, as the signal handler sees it (one at a time: prefork)."""

    def __init__(self) -> None:
        self.active = False
        self.interruptible = False
        self.reason: type[BaseException] = HandBack
        self.pending: type[BaseException] | None = None

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        self.active, self.reason, self.pending = True, HandBack, None
        try:
            yield
        finally:
            self.active, self.interruptible, self.pending = False, False, None


_run = _Run()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A section of the running task that the hand-back (or :func:`stop_run`) may cut short.

    A signal that came while the task was outside any such section raises
    here, on entry.
    """
    if _run.pending is not None:
        raise _run.pending()
    outer = _run.interruptible
    _run.interruptible = True
    try:
        yield
    finally:
        _run.interruptible = outer


def interrupt(_signum: int = HANDBACK_SIGNAL, _frame: object = None) -> None:
    """The pool child's :data:`HANDBACK_SIGNAL` handler: raise in the task now, or at its next section.

    Signal context: assignments only, or the raise itself.
    """
    if not _run.active:
        return
    if _run.interruptible:
        raise _run.reason()
    _run.pending = _run.reason


def stop_run(reason: type[BaseException]) -> bool:
    """From another thread of the pool child: raise ``reason`` in the running task, as the hand-back does.

    False where no hand-back handler is installed (not a pool child): nothing
    here can stop the run.
    """
    _run.reason = reason
    if signal.getsignal(HANDBACK_SIGNAL) is not interrupt:
        return False
    signal.pthread_kill(threading.main_thread().ident, HANDBACK_SIGNAL)
    return True


class HandBackTask(Task):
    """The base class of every task (``Celery(task_cls=HandBackTask)``): a stop hands it back.

    A :class:`HandBack` that leaves the task becomes ``Reject(requeue=True)``:
    with ``task_acks_late`` the message goes back to the queue, neither lost
    nor marked failed. A task can catch ``HandBack`` itself to record that it
    was handed back, then raise ``Reject`` (the demo's job task does).
    """

    #: The whole task may be cut short; False: only inside :func:`interruptible` sections.
    interrupt_anywhere = True
    #: A requeue the broker refuses (down at the stop) is done once it is back (stopright/requeue.py).
    Request = "stopright.requeue:Request"

    def __call__(self, *args, **kwargs):
        with _run.handling():
            try:
                if not self.interrupt_anywhere:
                    return super().__call__(*args, **kwargs)
                with interruptible():
                    return super().__call__(*args, **kwargs)
            except HandBack:
                log.warning("task %s[%s] handed back to the queue (interrupted by shutdown)",
                            self.name, getattr(self.request, "id", "?"))
                raise Reject(HANDED_BACK, requeue=True) from None


class QuietHandBack(logging.Filter):
    """Drop the traceback Celery logs with a hand-back's ``Reject`` (``celery.app.trace``).

    A hand-back at a stop is expected and already logged in one line above;
    a traceback per running task would bury the stop's sequence. Installed
    by ``stopright.install``; other ``Reject``s keep theirs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, Reject) and error.reason == HANDED_BACK:
            record.exc_info = None
            record.exc_text = None
        return True
