"""The hand-back protocol, where a task runs: a task that outlives the grace goes back to the queue.

The worker's MainProcess (stopright/worker_stop.py) sends :data:`HANDBACK_SIGNAL`
(SIGUSR2) to each pool child still running a task when the grace is used up.
Here, in the child, that signal raises :class:`HandBack` inside the task's
code (under the other pools, stopright/pools.py raises it in the task's
thread or throws it into its greenlet: :func:`interrupt_run`,
:func:`interrupt_green`); :class:`HandBackTask` turns it into ``Reject(requeue=True)``, so the
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
import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

from celery import Task, current_task, states
from celery.backends.base import DisabledBackend
from celery.exceptions import Reject

from stopright.upstream import cpython as cpython_internals

log = logging.getLogger("stopright")

#: Sent by the worker's MainProcess to a pool child whose task must hand back now.
HANDBACK_SIGNAL = signal.SIGUSR2
#: The reason of the ``Reject`` a hand-back raises.
HANDED_BACK = "handed back by shutdown"


class HandBack(BaseException):
    """Raised inside a running task when the worker's grace is used up.

    A BaseException, so task code catching ``Exception`` cannot swallow it.
    """


class _Run:
    """One task run, as the hand-back sees it: where it runs, and whether it may be cut now.

    Written by the run's own thread (or greenlet) and read by whoever delivers
    the hand-back: a signal handler in that same thread (prefork, solo), the
    stop's watchdog thread (threads) or the event hub (gevent, eventlet).
    ``lock`` serialises the run's section changes with a delivery from another
    thread; a signal handler never takes it (it runs inside the thread that
    may hold it).
    """

    def __init__(self, task_id: str | None = None) -> None:
        self.task_id = task_id
        self.ident = threading.get_ident()
        self.greenlet = _greenlet()
        self.active = False
        self.interruptible = False
        self.reason: type[BaseException] = HandBack
        self.pending: type[BaseException] | None = None
        self.delivered = False  # from another thread or the hub: once per run
        self.lock = threading.Lock()


#: The runs in progress in this process, by where they run (:func:`_here`) and by task id.
_runs: dict[object, _Run] = {}
_by_task: dict[str, _Run] = {}
#: How a hand-back reaches a run: "signal" (prefork, solo: a handler in the run's thread),
#: "thread" (threads: an exception raised in the run's thread), "green" (gevent, eventlet).
_delivery = {"kind": "signal"}


def configure(delivery: str) -> None:
    """How hand-backs reach a run in this process (:data:`_delivery`); once, before any task runs."""
    _delivery["kind"] = delivery


def _greenlet() -> Any:  # a greenlet.greenlet, or None
    module = sys.modules.get("greenlet") if _delivery["kind"] == "green" else None
    return module.getcurrent() if module is not None else None


def _here() -> object:
    """This run's key: its greenlet under gevent and eventlet, else its thread."""
    glet = _greenlet()
    return id(glet) if glet is not None else threading.get_ident()


def _current() -> _Run:
    """The run of this thread (or greenlet); outside any run, an inactive one of its own."""
    return _runs.get(_here()) or _Run()


class _Runs:
    """``_run``: the current thread's (or greenlet's) run, as HandBackTask and the shape tests use it."""

    @contextlib.contextmanager
    def handling(self, task_id: str | None = None) -> Iterator[None]:
        """Around one run of a task (``task_id``: default, the task Celery is running here)."""
        key = _here()
        outer = _runs.get(key)
        if outer is not None and outer.active:  # a task called inside a task: part of the same run
            yield
            return
        run = _Run(task_id or _task_id())
        run.active = True
        _runs[key] = run
        if run.task_id is not None:
            _by_task[run.task_id] = run
        try:
            yield
        finally:
            with run.lock:
                run.active, run.interruptible, run.pending = False, False, None
            _runs.pop(key, None)
            if run.task_id is not None and _by_task.get(run.task_id) is run:
                del _by_task[run.task_id]

    def __getattr__(self, name: str) -> object:
        return getattr(_current(), name)


_run = _Runs()


def _task_id() -> str | None:
    """The id of the task this thread (or greenlet) is running, from Celery's task stack."""
    request = getattr(current_task, "request", None)
    return getattr(request, "id", None)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A section of the running task that the hand-back (or :func:`stop_run`) may cut short.

    A hand-back that came while the task was outside any such section raises
    here, on entry. The section is marked open before the check: a signal
    landing between the two raises at once instead of being left pending.
    """
    run = _current()
    with run.lock:
        outer = run.interruptible
        run.interruptible = True
        if run.pending is not None:
            raise run.pending()
    try:
        yield
    finally:
        with run.lock:  # a delivery from another thread lands here at the latest, still in the section
            run.interruptible = outer


def interrupt(_signum: int = HANDBACK_SIGNAL, _frame: object = None) -> None:
    """The :data:`HANDBACK_SIGNAL` handler (prefork child, solo MainProcess): raise in the task now, or
    at its next section.

    Signal context, in the thread that runs the task: assignments only, or the raise itself.
    """
    run = _runs.get(_here())
    if run is None or not run.active:
        return
    if run.interruptible:
        raise run.reason()
    run.pending = run.reason


def interrupt_run(task_id: str, reason: type[BaseException] = HandBack) -> bool:
    """From the worker's stop (another thread): hand back the run of ``task_id`` (threads pool).

    The exception is raised in the run's thread at its next bytecode: a
    thread blocked in a C call (``time.sleep``, a socket read) gets it only
    when that call returns. False if no such run is in progress here.
    """
    run = _by_task.get(task_id)
    if run is None:
        return False
    with run.lock:
        if not run.active:
            return False
        if run.delivered:  # once: a second exception could land after the task caught the first
            return True
        run.delivered, run.reason = True, reason
        if run.interruptible:
            cpython_internals.raise_in_thread(run.ident, reason)
        else:
            run.pending = reason
    return True


def interrupt_green(task_id: str, reason: type[BaseException] = HandBack) -> bool:
    """In the event hub (gevent, eventlet), every task greenlet paused: hand back the run of ``task_id``.

    The exception is thrown into the task's greenlet where it waits (a
    cooperative sleep or socket read); False if no such run is in progress.
    """
    run = _by_task.get(task_id)
    if run is None or not run.active or run.greenlet is None:
        return False
    if run.delivered:
        return True
    run.delivered, run.reason = True, reason
    if run.interruptible:
        run.greenlet.throw(reason)
    else:
        run.pending = reason
    return True


def abandoned_threads() -> list[int]:
    """The threads of the runs still in progress here (at the stop's end: those it gave up on)."""
    return [run.ident for run in list(_by_task.values()) if run.active]


def stop_run(reason: type[BaseException]) -> bool:
    """From another thread of the pool child: raise ``reason`` in the running task, as the hand-back does.

    False where no hand-back handler is installed (not a pool child): nothing
    here can stop the run.
    """
    run = _runs.get(threading.main_thread().ident)
    if run is not None:
        run.reason = reason
    if signal.getsignal(HANDBACK_SIGNAL) is not interrupt:
        return False
    signal.pthread_kill(cast(int, threading.main_thread().ident), HANDBACK_SIGNAL)  # started: an ident
    return True


#: How long a hand-back may spend resetting the task's stored state (its pool child is SIGKILLed 0.5 s after
#: the hand-back signal if it has not handed back by then).
RESET_STATE_SECONDS = 0.2


class _Calls(threading.local):
    """The run of this thread, as the task wrappers see it: nested calls (a subclass's ``__call__``
    calling ``super().__call__``, a task calling another directly) belong to the outermost one."""

    depth = 0
    stored_state = False  # the run stored a state of its own (update_state)


_calls = _Calls()


def _handing_back(call: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task class's ``__call__``: the run it makes is the one the hand-back interrupts.

    Celery calls a task class's own ``__call__`` instead of ``run()`` (``task_has_custom``,
    stopright/upstream/celery.py REACHES), so whatever that ``__call__`` does (Flask's
    ``FlaskTask`` runs ``self.run`` in the app context, never ``Task.__call__``), this wrapper
    is around it. Reentrant: only the outermost wrapper of a thread hands back.
    """

    @functools.wraps(call)
    def __call__(self: HandBackTask, *args: Any, **kwargs: Any) -> Any:
        if _calls.depth:
            return call(self, *args, **kwargs)
        _calls.depth, _calls.stored_state = 1, False
        try:
            with _run.handling():
                try:
                    if not self.interrupt_anywhere:
                        return call(self, *args, **kwargs)
                    with interruptible():
                        return call(self, *args, **kwargs)
                except HandBack:
                    log.warning("task %s[%s] handed back to the queue (interrupted by shutdown)",
                                self.name, getattr(self.request, "id", "?"))
                    _reset_stored_state(self)
                    raise Reject(HANDED_BACK, requeue=True) from None
        finally:
            _calls.depth = 0

    __call__._hands_back = True  # type: ignore[attr-defined]
    return __call__


def _reset_stored_state(task: HandBackTask) -> None:
    """A handed-back run's stored state (``PROGRESS``, ``STARTED``) back to ``PENDING``, bounded.

    The run is over and the task waits in the queue: a status page must not
    show it in progress while no worker runs it. At most
    :data:`RESET_STATE_SECONDS`: a result backend that is down must not hold the
    hand-back (the pool child exits soon after, and the write with it).
    """
    request = task.request
    task_id = getattr(request, "id", None)
    backend = task.backend  # this thread's: Celery builds one per thread, a new one would connect anew
    stored = _calls.stored_state or (task.track_started and not task.ignore_result)
    if not stored or task_id is None or isinstance(backend, DisabledBackend):
        return
    errors: list[BaseException] = []

    def store() -> None:
        try:
            backend.store_result(task_id, None, states.PENDING, request=request)
        except Exception as exc:  # noqa: BLE001 - reported below, the hand-back goes on
            errors.append(exc)

    thread = threading.Thread(target=store, name="stopright-reset-state", daemon=True)
    thread.start()
    thread.join(RESET_STATE_SECONDS)
    if thread.is_alive() or errors:
        log.warning("task %s[%s]: its stored state could not be reset to PENDING (%s): the result "
                    "backend shows its last state until it runs again", task.name, task_id,
                    repr(errors[0]) if errors else f"no answer within {RESET_STATE_SECONDS} s")


class HandBackTask(Task):
    """The base class of every task (``Celery(task_cls=HandBackTask)``): a stop hands it back.

    A :class:`HandBack` that leaves the task becomes ``Reject(requeue=True)``:
    with ``task_acks_late`` the message goes back to the queue, neither lost
    nor marked failed, and a state the run stored (``update_state``,
    ``task_track_started``) is reset to ``PENDING``. A task can catch
    ``HandBack`` itself to record that it was handed back, then raise
    ``Reject`` (the demo's job task does). A subclass may define its own
    ``__call__`` (Flask's ``FlaskTask``): it is wrapped the same way.
    """

    #: The whole task may be cut short; False: only inside :func:`interruptible` sections.
    interrupt_anywhere = True
    #: A lost broker connection hands the run back (the broker gives its message out again at once:
    #: it would run twice at the same time). False for a task that fences its own runs (a ledger
    #: claim, a lock): it runs on through the outage and the second delivery finds it fenced.
    hand_back_on_connection_loss = True
    #: A requeue the broker refuses (down at the stop) is done once it is back (stopright/requeue.py).
    Request = "stopright.requeue:Request"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__call__")
        if own is not None and not getattr(own, "_hands_back", False):
            cls.__call__ = _handing_back(own)  # type: ignore[method-assign]

    __call__ = _handing_back(Task.__call__)

    def update_state(self, task_id: str | None = None, state: str | None = None, meta: Any = None,
                     **kwargs: Any) -> None:
        if task_id is None or task_id == getattr(self.request, "id", None):
            _calls.stored_state = True
        super().update_state(task_id, state, meta, **kwargs)


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
