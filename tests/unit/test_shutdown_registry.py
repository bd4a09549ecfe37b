"""ShutdownRegistry (app/stop_signals.py): once, newest first, isolated, bounded, logged."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading

import pytest

from stopright import registry as shutdown_registry
from stopright import signals as stop_signals
from stopright.registry import Outcome, ShutdownRegistry

LOGGER = "shutdown"


class FakeClock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock) -> ShutdownRegistry:
    return ShutdownRegistry(clock=clock)


@pytest.fixture
def shutdown_logs(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


# -- running the handlers -------------------------------------------------------


def test_handlers_run_newest_first(registry):
    ran = []
    for name in ("database", "redis client", "celery broker connections"):
        registry.register(name, lambda name=name: ran.append(name))

    outcomes = registry.close_all()

    assert ran == ["celery broker connections", "redis client", "database"]
    assert [(o.name, o.status) for o in outcomes] == [
        ("celery broker connections", "closed"),
        ("redis client", "closed"),
        ("database", "closed"),
    ]


def test_each_handler_runs_once_across_repeated_close_all(registry):
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    registry.register("a", lambda: bump("a"))
    registry.register("b", lambda: bump("b"))

    registry.close_all()
    registry.close_all()

    assert calls == {"a": 1, "b": 1}


def test_close_all_twice_returns_nothing_the_second_time(registry, shutdown_logs):
    registry.register("database", lambda: None)
    assert len(registry.close_all()) == 1
    shutdown_logs.clear()

    assert registry.close_all() == []
    assert messages(shutdown_logs) == []


def test_names_lists_registered_handlers_in_registration_order_until_closed(registry):
    registry.register("database", lambda: None)
    registry.register("redis client", lambda: None)
    assert registry.names() == ["database", "redis client"]

    registry.close_all()

    assert registry.names() == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError(9, "bad fd"), SystemExit(3)],
                         ids=["RuntimeError", "OSError", "SystemExit"])
def test_a_failing_handler_is_logged_and_the_others_still_run(registry, shutdown_logs, error):
    ran = []
    registry.register("first", lambda: ran.append("first"))

    def broken():
        raise error

    registry.register("broken", broken)
    registry.register("last", lambda: ran.append("last"))

    outcomes = registry.close_all()

    assert ran == ["last", "first"]
    assert [(o.name, o.status) for o in outcomes] == [
        ("last", "closed"), ("broken", "failed"), ("first", "closed")]
    [failure] = [r for r in shutdown_logs.records if r.levelno == logging.ERROR]
    assert failure.name == LOGGER
    assert failure.getMessage().startswith("closing broken failed: ")
    assert repr(error) in failure.getMessage()
    assert failure.exc_info is not None and failure.exc_info[1] is error


def test_a_hanging_handler_is_abandoned_after_its_timeout_and_the_others_still_run(
        registry, shutdown_logs):
    release = threading.Event()
    entered = threading.Event()
    ran = []

    def hang():
        entered.set()
        release.wait()

    try:
        registry.register("first", lambda: ran.append("first"))
        registry.register("stuck", hang, timeout=0.2)
        registry.register("last", lambda: ran.append("last"))

        outcomes = registry.close_all()

        assert entered.is_set()
        assert not release.is_set()  # still hanging: abandoned, not finished
        assert ran == ["last", "first"]
        assert [(o.name, o.status) for o in outcomes] == [
            ("last", "closed"), ("stuck", "timed out"), ("first", "closed")]
        assert "closing stuck timed out after 0.2 s; abandoned" in messages(shutdown_logs)
        assert "closed stuck" not in " ".join(messages(shutdown_logs))
        (where,) = [m for m in messages(shutdown_logs) if m.startswith("closing stuck was stuck here:")]
        assert "in hang" in where and "release.wait()" in where  # the stack of the stuck close
    finally:
        release.set()


def test_the_registry_default_timeout_applies_when_register_gives_none(clock):
    registry = ShutdownRegistry(handler_timeout=0.2, clock=clock)
    release = threading.Event()
    try:
        registry.register("stuck", release.wait)
        [outcome] = registry.close_all()
        assert outcome.status == "timed out"
    finally:
        release.set()


def test_outcome_elapsed_comes_from_the_clock(registry, clock):
    registry.register("slow", lambda: clock.advance(0.25))

    assert registry.close_all() == [Outcome("slow", "closed", 0.25)]


# -- registering late -------------------------------------------------------------


def test_registering_after_close_all_closes_the_resource_at_once(registry, shutdown_logs):
    registry.close_all()
    closed = []

    registry.register("late client", lambda: closed.append("late client"))

    assert closed == ["late client"]
    assert registry.names() == []
    assert "late client registered after shutdown; closing it now" in messages(shutdown_logs)
    assert registry.close_all() == []
    assert closed == ["late client"]


def test_a_failing_late_handler_does_not_raise_into_register(registry, shutdown_logs):
    registry.close_all()

    def broken():
        raise RuntimeError("late boom")

    registry.register("late", broken)  # must not raise

    assert "closing late failed: RuntimeError('late boom')" in messages(shutdown_logs)


def test_registering_after_begin_but_before_close_all_is_still_queued(registry):
    registry.begin()
    closed = []

    registry.register("client", lambda: closed.append("client"))

    assert closed == []
    assert registry.names() == ["client"]
    registry.close_all()
    assert closed == ["client"]


# -- the log sequence -------------------------------------------------------------


def test_the_log_tells_the_shutdown_story_in_order(registry, clock, shutdown_logs):
    registry.register("database", lambda: clock.advance(0.5))
    registry.register("redis client", lambda: clock.advance(1.0))

    registry.signal_received(signal.SIGTERM)
    registry.close_all()

    assert messages(shutdown_logs) == [
        "signal received: SIGTERM",
        "graceful shutdown started",
        "closing redis client",
        "closed redis client in 1000 ms",
        "closing database",
        "closed database in 500 ms",
        "shutdown complete in 1500 ms",
    ]


def test_shutdown_complete_counts_from_the_signal_not_from_close_all(registry, clock, shutdown_logs):
    registry.signal_received(signal.SIGINT)
    clock.advance(1.5)  # e.g. the grace period for running work

    registry.close_all()

    assert messages(shutdown_logs)[-1] == "shutdown complete in 1500 ms"


def test_close_all_without_a_signal_still_logs_the_start(registry, shutdown_logs):
    registry.close_all()

    assert messages(shutdown_logs) == ["graceful shutdown started", "shutdown complete in 0 ms"]


def test_a_second_signal_is_not_logged_again(registry, shutdown_logs):
    registry.signal_received(signal.SIGTERM)
    registry.signal_received(signal.SIGINT)

    infos = [r.getMessage() for r in shutdown_logs.records if r.levelno >= logging.INFO]
    assert infos == ["signal received: SIGTERM", "graceful shutdown started"]
    assert registry.recorded_signal == signal.SIGTERM


def test_begin_with_detail_names_it_in_the_log(registry, shutdown_logs):
    registry.begin("grace 3.0 s for 2 running task(s)")

    assert messages(shutdown_logs) == ["graceful shutdown started (grace 3.0 s for 2 running task(s))"]


def test_begin_is_true_the_first_time_only_and_logs_once(registry, shutdown_logs):
    assert registry.begin() is True
    assert registry.begin("again") is False
    assert registry.begin() is False

    assert messages(shutdown_logs) == ["graceful shutdown started"]


def test_begin_after_signal_received_is_a_no_op(registry, shutdown_logs):
    registry.signal_received(signal.SIGTERM)

    assert registry.begin("something else") is False
    assert not any("something else" in m for m in messages(shutdown_logs))


def test_signal_received_passes_its_detail_to_the_start_line(registry, shutdown_logs):
    registry.signal_received(signal.SIGTERM, "grace 3.0 s for 1 running task(s)")

    assert "graceful shutdown started (grace 3.0 s for 1 running task(s))" in messages(shutdown_logs)


# -- state --------------------------------------------------------------------------


def test_shutting_down_is_set_by_begin(registry):
    assert not registry.shutting_down.is_set()

    registry.begin()

    assert registry.shutting_down.is_set()


@pytest.mark.parametrize("start", ["begin", "signal_received", "close_all"])
def test_every_way_into_the_shutdown_sets_shutting_down(registry, start):
    {"begin": registry.begin,
     "signal_received": lambda: registry.signal_received(signal.SIGTERM),
     "close_all": registry.close_all}[start]()

    assert registry.shutting_down.is_set()


def test_elapsed_ms_is_zero_before_begin_and_clock_based_after(registry, clock):
    assert registry.elapsed_ms == 0

    registry.begin()
    clock.advance(0.0424)

    assert registry.elapsed_ms == 42


# -- one registry per process ----------------------------------------------------------


def test_current_returns_the_same_registry_within_a_process():
    first = shutdown_registry.current()

    assert shutdown_registry.current() is first
    assert isinstance(first, ShutdownRegistry)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_current_in_a_forked_child_is_a_fresh_empty_registry():
    parent = shutdown_registry.current()
    parent.register("parent database", lambda: None)
    parent.begin()
    read_fd, write_fd = os.pipe()

    pid = os.fork()
    if pid == 0:  # child: report, never return into pytest
        status = 1
        try:
            os.close(read_fd)
            child = shutdown_registry.current()
            report = (f"fresh={child is not parent} names={child.names()} "
                      f"stopping={child.shutting_down.is_set()} "
                      f"stable={shutdown_registry.current() is child}")
            os.write(write_fd, report.encode())
            status = 0
        finally:
            os._exit(status)

    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read().decode()
    finally:
        _, wait_status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert report == "fresh=True names=[] stopping=False stable=True"
    assert shutdown_registry.current() is parent
    assert parent.names() == ["parent database"]


# -- chain_signal ------------------------------------------------------------------------


@pytest.fixture
def sigusr1():
    original = signal.getsignal(signal.SIGUSR1)
    try:
        yield signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_chain_signal_runs_before_then_the_previous_handler(sigusr1):
    calls = []
    signal.signal(sigusr1, lambda sig, frame: calls.append(("previous", sig)))

    stop_signals.chain_signal(sigusr1, lambda sig: calls.append(("before", sig)))
    os.kill(os.getpid(), sigusr1)

    assert calls == [("before", sigusr1), ("previous", sigusr1)]


def test_chain_signal_with_an_ignored_previous_handler_runs_before_only(sigusr1):
    calls = []
    signal.signal(sigusr1, signal.SIG_IGN)

    stop_signals.chain_signal(sigusr1, lambda sig: calls.append(sig))
    os.kill(os.getpid(), sigusr1)

    assert calls == [sigusr1]


def test_chain_signal_with_report_signals_logs_the_signal_from_a_thread(sigusr1, registry, shutdown_logs):
    previous = []
    signal.signal(sigusr1, lambda sig, frame: previous.append(sig))

    stop_signals.chain_signal(sigusr1, stop_signals.report_signals(registry))
    os.kill(os.getpid(), sigusr1)

    assert registry.shutting_down.wait(10)  # set by the reporting thread, after its two lines
    assert messages(shutdown_logs)[:2] == ["signal received: SIGUSR1", "graceful shutdown started"]
    assert previous == [sigusr1]


def test_closed_log_line_reports_whole_milliseconds(registry, clock, shutdown_logs):
    registry.register("db", lambda: clock.advance(0.0126))

    registry.close_all()

    closed = [m for m in messages(shutdown_logs) if m.startswith("closed db")]
    assert closed == ["closed db in 13 ms"]
    assert re.fullmatch(r"shutdown complete in \d+ ms", messages(shutdown_logs)[-1])


def test_chain_signal_keeps_the_default_action_of_an_unhandled_signal():
    # SIG_DFL for SIGUSR1 is "terminate": after the chained callback, the process still dies by it.
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            stop_signals.chain_signal(signal.SIGUSR1, lambda sig: os.write(write_fd, b"before"))
            os.kill(os.getpid(), signal.SIGUSR1)
            os.write(write_fd, b"+survived")
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as pipe:
        written = pipe.read()
    assert written == b"before"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1


# -- a budget for the whole sequence (a stop running late) -----------------------


def test_a_budget_bounds_the_whole_sequence_and_every_handler_still_runs(shutdown_logs):
    registry = ShutdownRegistry(handler_timeout=5.0)  # the real clock: the handlers really wait
    release = threading.Event()
    ran = []
    registry.register("first", lambda: ran.append("first"))
    registry.register("hangs", release.wait)
    try:
        outcomes = registry.close_all(budget=0.2)
    finally:
        release.set()
    assert [(o.name, o.status) for o in outcomes] == [("hangs", "timed out"), ("first", "closed")]
    assert ran == ["first"]  # still run once the budget was spent, with the minimum time
    assert outcomes[0].elapsed < 1.0  # cut at the budget, not at its own 5 s
    assert "closing hangs timed out after 0.2 s; abandoned" in messages(shutdown_logs)


def test_log_stacks_logs_every_thread_by_name(shutdown_logs):
    parked = threading.Event()
    thread = threading.Thread(target=parked.wait, name="parked-for-the-test", daemon=True)
    thread.start()
    try:
        stop_signals.log_stacks("phase overran")
    finally:
        parked.set()
        thread.join()
    logged = messages(shutdown_logs)
    assert any(m.startswith("phase overran: stack of thread parked-for-the-test:") and "wait" in m
               for m in logged), logged
    assert any(m.startswith("phase overran: stack of thread MainThread:") for m in logged), logged


# -- the manager a program follows (stop_with_parent) --------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PRINT_MANAGER = ("import os; from stopright import signals as stop_signals; "
                  "print(os.getppid(), stop_signals._manager_pid())")


@pytest.mark.parametrize(("line", "wrapped"), [
    ("{python} -c '{code}'", True),  # honcho: dash forks the program and waits
    ("{python} -c '{code}'; true", True),
    ("exec {python} -c '{code}'", False),  # the shell is replaced: our parent is the manager
])
def test_the_manager_is_the_shells_parent_when_a_sh_c_stands_between(line, wrapped):
    import subprocess
    import sys

    command = line.format(python=sys.executable, code=_PRINT_MANAGER)
    shell = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    out, _ = shell.communicate(timeout=30)
    parent, manager = map(int, out.split())
    assert manager == os.getpid()
    assert parent == (shell.pid if wrapped else os.getpid())


def test_a_program_stops_when_the_manager_behind_its_sh_c_dies(tmp_path):
    # honcho SIGKILLed: its helper (the manager here) dies, the `sh -c` lives on.
    import subprocess
    import sys
    import time

    program = ("import signal, sys, time; from stopright import signals as stop_signals\n"
               "signal.signal(signal.SIGTERM, lambda *_: (print('stopping', flush=True), sys.exit(0)))\n"
               "stop_signals.stop_with_parent(); print('up', flush=True); time.sleep(60)")
    script = tmp_path / "program.py"
    script.write_text(program)
    out = tmp_path / "out"
    manager = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen(['/bin/sh', '-c', '{sys.executable} {script} > {out}'])\n"
        "time.sleep(60)")], env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 20
        while "up" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        manager.kill()
        manager.wait()
        while "stopping" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_text().split() == ["up", "stopping"]
    finally:
        manager.kill()
