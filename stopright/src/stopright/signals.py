"""Signals: handlers that only record, the stop signals, following the manager's death, stack dumps.

A Python signal handler runs in the main thread between two bytecodes,
perhaps while that thread holds a lock (the registry's, a logging
handler's): a handler that logs or locks can deadlock its process. So every
handler here only records (assignments, one ``write(2)``) and wakes a loop
or a thread that logs (gunicorn's arbiter: "NO LOGGING, just queue the signal").
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import posix
import select
import selectors
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from types import FrameType

from stopright import registry
from stopright.registry import STOP_SIGNALS as STOP_SIGNALS  # re-exported: the public name lives here
from stopright.registry import ShutdownRegistry

log = logging.getLogger("stopright")


def chain_signal(signum: int, before: Callable[[int], object]) -> None:
    """Run ``before(signum)`` ahead of the handler already installed for ``signum``.

    For recording the signal in processes whose server owns the handler
    (gunicorn workers): its behaviour stays exactly as it was. ``before``
    runs in signal context: it must only record (:func:`report_signals`).
    """
    previous = signal.getsignal(signum)

    def handler(sig: int, frame: FrameType | None) -> None:
        before(sig)
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:  # e.g. terminate: do it, as before
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    signal.signal(signum, handler)


#: ``write(2)`` and ``read(2)`` as the C library does them. eventlet's ``os.write`` and ``os.read``
#: wait in its hub until the descriptor is ready, even a non-blocking one: a signal handler (run in
#: the hub) must not ("do not call blocking functions from the mainloop"), and a drain that expects
#: ``BlockingIOError`` would wait for ever. gevent leaves both alone; ``posix`` is never patched.
raw_write, raw_read = posix.write, posix.read


class Wakeup:
    """A self-pipe: :meth:`set` from a signal handler, :meth:`wait` in a loop or a thread.

    ``set`` is one non-blocking ``write(2)``: no lock a signal could find
    held (a ``threading.Event`` takes one), no logging. ``wait`` wakes at
    once, even when the signal landed just before it started. One per
    process, kept for its life (two file descriptors, whatever their
    number: ``poll``, not ``select``, which refuses a descriptor of 1024 or
    more and took the stop's watchdog down with it).
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self) -> None:
        try:
            raw_write(self._write, b"!")
        except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Until :meth:`set` (True; the wake-up is used up) or ``timeout`` seconds (False)."""
        if not _readable(self._read, timeout):
            return False
        try:
            while raw_read(self._read, 512):
                pass
        except BlockingIOError:
            pass
        return True


def _readable(fd: int, timeout: float | None) -> bool:
    """``fd`` has data within ``timeout`` seconds (None: no limit); any descriptor number.

    ``select.poll`` where it exists (gevent's cooperative one under gevent);
    eventlet removes it, and its ``selectors`` wait in its hub instead.
    """
    poll = getattr(select, "poll", None)
    if poll is not None:
        poller = poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(timeout))


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




def exit_on_stop_signals() -> None:
    """Until the program installs its own stop handlers, a stop signal exits at once (code 0).

    For the first seconds of a Celery worker or beat (imports, banner:
    1 to 5 s on a loaded machine), before Celery and stopright install their
    handlers. Nothing is open yet to close or hand back. Without this, a
    stop then (a crash-looping deploy, a fast rollout) meets the default
    action: death by signal, or, as PID 1 of a container, nothing at all
    (the kernel drops it) until the platform's SIGKILL. Call it first thing
    at import of the program's app module, only in that program. Before
    that (the interpreter's start, the CLI's own imports: a fraction of a
    second, seconds on a loaded machine) the default action remains.
    """

    def leave(signum: int, _frame: object) -> None:  # no logging in a handler: one write(2)
        raw_write(2, f"{signal.Signals(signum).name} before start-up finished: exiting\n".encode())
        registry.current().record_signal(signum)  # a close on the way out then ignores repeats
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
    Where ``sys.stderr`` is no file (Celery's default ``worker_redirect_stdouts``
    makes it a ``LoggingProxy``), the dump goes to file descriptor 2.
    """
    faulthandler.register(STACK_DUMP_SIGNAL, file=_stderr_fd(), all_threads=True, chain=False)


def _stderr_fd() -> int:
    """``sys.stderr``'s file descriptor, or 2 where it has none (a logging proxy, a closed stream)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


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


def stop_with_parent(signum: int = signal.SIGTERM, *, after: int | None = None) -> None:
    """Get ``signum`` when the manager that started us dies; never run on as an orphan.

    A closed terminal (SIGHUP) or a SIGKILL kills honcho but not its children,
    which are each in a session of their own: without this they keep running
    (and serving, and holding jobs) until someone finds them with ``ps``.
    With it, they get SIGTERM and stop as gracefully as on Ctrl+C. Linux only;
    elsewhere a no-op. Call it early in each top-level process (gunicorn
    master, Celery worker and beat, the broker launcher); forked children do
    not inherit it.

    honcho runs each Procfile line as ``sh -c '<line>'`` under a reader
    process of its own (a fork of honcho), and dash does not exec the last
    command, so two processes stand between the manager and us (the Procfile
    has no ``exec``: foreman's exports and supervisord cannot run one). Both
    outlive a dying manager, so the manager itself (:func:`_manager_pid`) is
    watched too (``pidfd``): without a terminal no SIGHUP tells anyone. The
    shell's own death still stops us: it dies only of a signal meant for us,
    and a manager that signals only it
    (stock ``honcho export supervisord``: SIGQUIT, no ``stopasgroup``) would
    otherwise leave us running unseen. Under honcho that is a second SIGTERM
    a moment after the group's, which every process takes as a repeat.

    ``after``: our parent's pid when it is meant to leave first (the old
    gunicorn master that started this one by its ``USR2`` upgrade): no
    parent-death signal then; the manager that started it is followed.
    """
    if after is None:
        if parent_death_signal(signum) and os.getppid() != _parent_at_start:
            os.kill(os.getpid(), signum)  # it died while we were starting
            return
    elif os.getppid() != after:  # it has left already: whom it followed is unknown
        return
    manager = _manager_pid(after)
    if manager != os.getppid():
        _watch_manager(manager, signum)


def _manager_pid(child: int | None = None) -> int:
    """The manager that started us (or ``child``): the first ancestor that is not only a go-between.

    Go-betweens (:func:`_stands_between`): a ``sh -c`` running our line, a
    fork of its own parent (honcho 2.0 reads each entry's output in a
    ``multiprocessing.Process``, a fork of honcho that ignores SIGINT/SIGTERM
    and lives as long as the entry), multiprocessing's spawn and forkserver
    helpers. Never above the manager: ``nohup honcho start &`` must outlive its shell.
    """
    pid = os.getppid() if child is None else _parent_of(child)
    while pid > 1:
        process = _process(pid)
        if process is None:
            return pid
        argv, parent = process
        if parent < 1 or not _stands_between(argv, parent):
            return pid
        pid = parent
    return pid


def _process(pid: int) -> tuple[list[bytes], int] | None:
    """``pid``'s command line and parent pid from ``/proc``; None if unknown (gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            parent = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return argv, parent


def _stands_between(argv: list[bytes], parent: int) -> bool:
    """A process (``argv``, child of ``parent``) that only relays for its parent: see :func:`_manager_pid`."""
    if len(argv) >= 3 and os.path.basename(argv[0].decode(errors="replace")) in _SHELLS and argv[1] == b"-c":
        return True
    if any(arg.startswith(b"from multiprocessing.") for arg in argv):  # spawn or forkserver helpers
        return True
    parents = _process(parent)
    return parents is not None and parents[0] == argv  # a fork that did not exec


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return pid


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
        _readable(pidfd, None)  # not select(): a descriptor of 1024 or more would end this thread
        log.warning("the process manager (pid %d) is gone: stopping", pid)
        os.kill(os.getpid(), signum)

    threading.Thread(target=wait, name="manager-watch", daemon=True).start()


def parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG)``: the kernel sends ``signum`` when our parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    return bool(ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum) == 0)


def die_with_parent() -> None:
    """``preexec_fn`` of a server we run as a child: SIGTERM when we die, even by SIGKILL (no orphan)."""
    parent_death_signal(signal.SIGTERM)


def terminate_and_wait(child: subprocess.Popen[bytes], wait: float, name: str) -> None:
    """SIGTERM the server ``child`` (Redis saves, then exits 0) and wait ``wait`` s at most.

    One still stopping after that is left to finish: it is in its own
    session, out of the manager's reach, and exits once its data is written;
    killing it would lose what it has not written yet (and the kernel repeats
    the SIGTERM when we exit: :func:`die_with_parent`).
    """
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        log.warning("%s %d still stopping after %.1f s; it exits once its data is written",
                    name, child.pid, wait)
