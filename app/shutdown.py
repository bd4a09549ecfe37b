"""The shutdown registry: one per process, closing what that process opened.

Every resource that holds a connection (SQLAlchemy engine, Redis client,
Celery's broker connection and producer pools) registers a named close
handler in the process that opened it. When the process stops, the handlers
run once, newest first (a client is closed before the pool it came from),
each in its own thread with a time limit: one that raises is logged and the
rest still run, one that hangs is abandoned so the process can still exit
before the platform's SIGKILL (honcho: 5 s; Heroku, Kubernetes: 30 s).

Who calls :meth:`ShutdownRegistry.close_all`:
  gunicorn worker  ``worker_exit``  (gunicorn.conf.py)
  gunicorn master  ``on_exit``      (gunicorn.conf.py)
  Celery worker    ``worker_shutdown`` in the MainProcess,
                   ``worker_process_shutdown`` in each pool child (tasks/lifecycle.py)
  Celery beat      scheduler ``close()`` (tasks/beat.py)
  embedded Redis   its launcher (broker/launcher.py)

Every process logs the same sequence, so a log shows at a glance who stopped
and how: ``signal received`` -> ``graceful shutdown started`` ->
``closing X`` -> ``closed X`` -> ``shutdown complete in N ms``.

Signal handlers only record (:meth:`ShutdownRegistry.record_signal`, a
:class:`Wakeup`); the first two lines come from the process's loop or a
watcher thread (:meth:`ShutdownRegistry.begin`), never from the handler.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("shutdown")

DEFAULT_HANDLER_TIMEOUT = 1.0
#: What a handler gets when a stop's budget is spent: a close that does not hang takes milliseconds.
MIN_HANDLER_SECONDS = 0.05


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "closed", "failed" or "timed out"
    elapsed: float


@dataclass(frozen=True)
class _Handler:
    name: str
    close: Callable[[], object]
    timeout: float


class ShutdownRegistry:
    """Named close handlers of one process, run once in reverse order."""

    def __init__(self, *, handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._handler_timeout = handler_timeout
        self._clock = clock
        self._handlers: list[_Handler] = []
        self._lock = threading.Lock()
        self._started_at: float | None = None
        self._closed = False
        #: The first stop signal, as :meth:`record_signal` noted it (a signal handler).
        self.recorded_signal: int | None = None
        self._signal_at = 0.0
        self.shutting_down = threading.Event()

    # -- registration -----------------------------------------------------
    def register(self, name: str, close: Callable[[], object], *, timeout: float | None = None) -> None:
        """Add a close handler; it runs at shutdown, before those registered earlier."""
        handler = _Handler(name, close, self._handler_timeout if timeout is None else timeout)
        with self._lock:
            late = self._closed
            if not late:
                self._handlers.append(handler)
        if late:
            # Opened while closing (a request that raced the shutdown): close it now.
            log.warning("%s registered after shutdown; closing it now", name)
            self._run(handler)

    def names(self) -> list[str]:
        with self._lock:
            return [h.name for h in self._handlers]

    # -- the shutdown sequence --------------------------------------------
    def record_signal(self, signum: int) -> None:
        """In a signal handler: note the stop signal (the first one) and its time; nothing else.

        A Python signal handler runs in the main thread between two
        bytecodes, maybe while that thread holds this registry's lock or a
        logging handler's lock: taking either here (both non-reentrant)
        would deadlock the process. So plain attribute assignments only, as
        gunicorn's arbiter ("NO LOGGING, just queue the signal"); the log
        lines come from :meth:`begin`, called by the process's loop or a
        watcher thread (:func:`report_signals`, :class:`Wakeup`).
        """
        if self.recorded_signal is None:
            self._signal_at = self._clock()
            self.recorded_signal = signum

    def signal_received(self, signum: int, detail: str = "") -> bool:
        """Outside a signal handler (a server's loop calling us): record the signal and begin."""
        self.record_signal(signum)
        return self.begin(detail)

    def begin(self, detail: str = "") -> bool:
        """Mark the process as shutting down, logging the recorded signal first; True the first time only.

        Never from a signal handler (it logs and locks): see :meth:`record_signal`.
        The start lines are logged under the lock, so a ``close_all`` racing in
        another thread logs its ``closing`` lines after them.
        """
        with self._lock:
            if self._started_at is not None:
                return False
            signum = self.recorded_signal
            self._started_at = self._clock() if signum is None else self._signal_at
            if signum is not None:
                log.info("signal received: %s", signal.Signals(signum).name)
            log.info("graceful shutdown started%s", f" ({detail})" if detail else "")
        self.shutting_down.set()
        return True

    @property
    def elapsed_ms(self) -> int:
        started = self._started_at
        return 0 if started is None else round((self._clock() - started) * 1000)

    def close_all(self, budget: float | None = None) -> list[Outcome]:
        """Run every handler once, newest first; later calls do nothing.

        ``budget`` bounds the whole sequence: each handler gets its own
        timeout or what is left of the budget, whichever is less (but at
        least :data:`MIN_HANDLER_SECONDS`, enough for a close that does not
        hang), so a process whose stop is running late still closes
        everything it can in the time it has.
        """
        self.begin()
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            handlers = list(reversed(self._handlers))
            self._handlers.clear()
        deadline = None if budget is None else self._clock() + budget
        outcomes = []
        for handler in handlers:
            left = None if deadline is None else max(MIN_HANDLER_SECONDS, deadline - self._clock())
            outcomes.append(self._run(handler, left))
        log.info("shutdown complete in %d ms", self.elapsed_ms)
        return outcomes

    def _run(self, handler: _Handler, left: float | None = None) -> Outcome:
        timeout = handler.timeout if left is None else min(handler.timeout, left)
        log.info("closing %s", handler.name)
        errors: list[BaseException] = []

        def target() -> None:
            try:
                handler.close()
            except BaseException as exc:  # noqa: BLE001 - isolate every handler
                errors.append(exc)

        started = self._clock()
        thread = threading.Thread(target=target, name=f"close-{handler.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        elapsed = self._clock() - started
        if thread.is_alive():
            log.error("closing %s timed out after %.1f s; abandoned", handler.name, timeout)
            frame = sys._current_frames().get(thread.ident or 0)
            if frame is not None:
                stack = "".join(traceback.format_stack(frame)).rstrip()
                log.error("closing %s was stuck here:\n%s", handler.name, stack)
            return Outcome(handler.name, "timed out", elapsed)
        if errors:
            log.error("closing %s failed: %r", handler.name, errors[0],
                      exc_info=(type(errors[0]), errors[0], errors[0].__traceback__))
            return Outcome(handler.name, "failed", elapsed)
        log.info("closed %s in %d ms", handler.name, round(elapsed * 1000))
        return Outcome(handler.name, "closed", elapsed)


_registry: ShutdownRegistry | None = None
_registry_pid: int | None = None


def chain_signal(signum: int, before: Callable[[int], object]) -> None:
    """Run ``before(signum)`` ahead of the handler already installed for ``signum``.

    For recording the signal in processes whose server owns the handler
    (gunicorn workers): its behaviour stays exactly as it was. ``before``
    runs in signal context: it must only record (:func:`report_signals`).
    """
    previous = signal.getsignal(signum)

    def handler(sig: int, frame: object) -> None:
        before(sig)
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:  # e.g. terminate: do it, as before
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    signal.signal(signum, handler)


class Wakeup:
    """A self-pipe: :meth:`set` from a signal handler, :meth:`wait` in a loop or a thread.

    ``set`` is one non-blocking ``write(2)``: no lock a signal could find
    held (a ``threading.Event`` takes one), no logging. ``wait`` wakes at
    once, even when the signal landed just before it started. One per
    process, kept for its life (two file descriptors).
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self) -> None:
        try:
            os.write(self._write, b"!")
        except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Until :meth:`set` (True; the wake-up is used up) or ``timeout`` seconds (False)."""
        readable, _, _ = select.select([self._read], [], [], timeout)
        if not readable:
            return False
        try:
            while os.read(self._read, 512):
                pass
        except BlockingIOError:
            pass
        return True


def report_signals(registry: ShutdownRegistry) -> Callable[[int], None]:
    """For a process whose loop is a server's (gunicorn worker): log its stop signal from a thread.

    Returns the function for the signal handler (e.g. through
    :func:`chain_signal`): it records the signal and wakes a daemon thread,
    which calls ``registry.begin()``: "signal received", "graceful shutdown
    started", and ``shutting_down`` set for the request threads (long polls
    answer at once).
    """
    wakeup = Wakeup()

    def record(signum: int) -> None:  # signal context: assignments and one write(2)
        registry.record_signal(signum)
        wakeup.set()

    def report() -> None:
        while registry.recorded_signal is None:
            wakeup.wait()
        registry.begin()

    threading.Thread(target=report, name="signal-report", daemon=True).start()
    return record


#: Every signal a manager stops with (SIGQUIT: supervisord's and `honcho export`'s): all graceful.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def exit_on_stop_signals() -> None:
    """Until the program installs its own stop handlers, a stop signal exits at once (code 0).

    For the first seconds of a Celery worker or beat (imports, banner:
    1 to 5 s on a loaded machine), before Celery and tasks/ install their
    handlers. Nothing is open yet to close or hand back. Without this, a
    stop then (a crash-looping deploy, a fast rollout) meets the default
    action: death by signal, or, as PID 1 of a container, nothing at all
    (the kernel drops it) until the platform's SIGKILL. Call it first thing
    at import of the program's app module, only in that program.
    """

    def leave(signum: int, _frame: object) -> None:  # no logging in a handler: one write(2)
        os.write(2, f"{signal.Signals(signum).name} before start-up finished: exiting\n".encode())
        raise SystemExit(0)

    for signum in STOP_SIGNALS:
        signal.signal(signum, leave)


#: ``kill -URG <pid>``: the process writes the stack of every thread to its
#: stderr (Sidekiq's TTIN). SIGURG because every process of the set is free
#: to take it and its default action is to do nothing: a ``pkill -URG`` that
#: also reaches redis-server or a shell harms nothing (gunicorn's master
#: uses TTIN and WINCH, Celery's MainProcess USR1, gunicorn's workers USR1).
STACK_DUMP_SIGNAL = signal.SIGURG


def enable_stack_dumps() -> None:
    """Answer :data:`STACK_DUMP_SIGNAL` with the stack of every thread, on stderr.

    Python's faulthandler writes the dump from its C signal handler, so it
    comes even when the main thread is stuck where no Python signal handler
    can run (a lock, a blocking read). Call in every process of the set;
    a forked child calls it again (some servers reset signals after fork).
    """
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


def log_stacks(reason: str) -> None:
    """Log the stack of every thread of this process, for a stop phase that overran.

    From a watchdog thread, never from a signal handler (it logs).
    """
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame)).rstrip()
        log.error("%s: stack of thread %s:\n%s", reason, names.get(ident, ident), stack)


_PR_SET_PDEATHSIG = 1
_parent_at_start = os.getppid()
#: Shells that run a Procfile line (``sh -c '<line>'``: honcho, a plain shell).
_SHELLS = {"sh", "dash", "bash", "ash", "zsh", "ksh"}


def stop_with_parent(signum: int = signal.SIGTERM) -> None:
    """Get ``signum`` when the manager that started us dies; never run on as an orphan.

    A closed terminal (SIGHUP) or a SIGKILL kills honcho but not its children,
    which are each in a session of their own: without this they keep running
    (and serving, and holding jobs) until someone finds them with ``ps``.
    With it, they get SIGTERM and stop as gracefully as on Ctrl+C. Linux only;
    elsewhere a no-op. Call it early in each top-level process (gunicorn
    master, Celery worker and beat, the broker launcher); forked children do
    not inherit it.

    honcho runs each Procfile line as ``sh -c '<line>'``, and dash does not
    exec the last command, so the shell stays between the manager and us
    (the Procfile has no ``exec``: foreman's exports and supervisord cannot run
    one). That shell outlives a dying manager, so the manager itself is
    watched too (``pidfd``). The shell's own death still stops us: it dies
    only of a signal meant for us, and a manager that signals only it
    (stock ``honcho export supervisord``: SIGQUIT, no ``stopasgroup``) would
    otherwise leave us running unseen. Under honcho that is a second SIGTERM
    a moment after the group's, which every process takes as a repeat.
    """
    if parent_death_signal(signum) and os.getppid() != _parent_at_start:
        os.kill(os.getpid(), signum)  # it died while we were starting
        return
    manager = _manager_pid()
    if manager != os.getppid():
        _watch_manager(manager, signum)


def _manager_pid() -> int:
    """Our parent, or the parent's parent when ours is only a ``sh -c`` wrapper of this line."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{parent}/stat", "rb") as f:
            grandparent = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return parent
    wrapper = len(argv) >= 3 and os.path.basename(argv[0].decode(errors="replace")) in _SHELLS \
        and argv[1] == b"-c"
    return grandparent if wrapper and grandparent > 1 else parent


def manager_command() -> str:
    """The command line of the manager that started us (see :func:`_manager_pid`); "" if unknown."""
    try:
        with open(f"/proc/{_manager_pid()}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _watch_manager(pid: int, signum: int) -> None:
    """Send ourselves ``signum`` when process ``pid`` exits (a daemon thread waits on its pidfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signum)
        return
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): the shell's PDEATHSIG at least
        return

    def wait() -> None:
        select.select([pidfd], [], [])
        log.warning("the process manager (pid %d) is gone: stopping", pid)
        os.kill(os.getpid(), signum)

    threading.Thread(target=wait, name="manager-watch", daemon=True).start()


def parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG)``: the kernel sends ``signum`` when our parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum) == 0


def current() -> ShutdownRegistry:
    """This process's registry; a forked child gets a fresh, empty one.

    A child must never close (or even use) the parent's connections, so the
    parent's handlers are not inherited: the child's resources register again
    when it reopens them.
    """
    global _registry, _registry_pid
    if _registry is None or _registry_pid != os.getpid():
        _registry, _registry_pid = ShutdownRegistry(), os.getpid()
    return _registry
