"""ShutdownRegistry (stopright/registry.py): once, newest first, isolated, bounded, one per process.

Its log lines: test_shutdown_log.py; stopright/signals.py: test_stopright_signals.py. The fixtures
``clock``, ``registry`` and ``shutdown_logs`` are in tests/unit/conftest.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from stopright import registry as shutdown_registry
from stopright.registry import Outcome, ShutdownRegistry
from tests.unit.shutdown_helpers import LOGGER, messages

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


def test_after_a_stop_by_signal_closed_repeats_are_ignored(registry):
    """CPython's teardown puts the default action back on Python handlers: a repeat would kill."""
    import signal

    registry.record_signal(signal.SIGTERM)
    registry.close_all()

    assert all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT))


def test_a_close_without_a_stop_signal_leaves_the_handlers(registry):
    import signal

    before = signal.getsignal(signal.SIGINT)
    registry.close_all()

    assert signal.getsignal(signal.SIGINT) is before


def test_a_closer_bound_to_its_thread_closes_with_same_thread() -> None:
    # SQLite's check_same_thread: its close() from another thread raises ProgrammingError.
    import sqlite3

    reg = ShutdownRegistry()
    other, own = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    reg.register("on a thread of its own", other.close)
    reg.register("on this thread", own.close, same_thread=True)
    outcomes = {o.name: o.status for o in reg.close_all()}
    assert outcomes == {"on this thread": "closed", "on a thread of its own": "failed"}
    with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
        own.execute("select 1")
    other.close()  # on its own thread now (unclosed, Python 3.13 warns when it is collected)
