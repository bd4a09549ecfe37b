"""Signal handlers only record: no lock the main thread may hold, no logging (issue 9, point 5).

A Python signal handler runs in the main thread between two bytecodes: if it
takes a non-reentrant lock that thread already holds (the registry's, a
logging handler's), the process deadlocks. Each handler here runs while the
registry's lock is a tripwire that fails the test on any acquire, and while
every log record is captured: none may come from inside the handler.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from celery.worker import state

from stopright import registry as shutdown_registry
from stopright import signals as stop_signals
from stopright.registry import ShutdownRegistry

ROOT = Path(__file__).resolve().parents[2]


class Tripwire:
    """Stands in for the registry's lock: any use from a handler fails the test."""

    def acquire(self, *_args, **_kwargs):
        raise AssertionError("a signal handler took the registry's lock")

    __enter__ = acquire

    def __exit__(self, *_exc) -> None:
        pass


@pytest.fixture
def registry(monkeypatch) -> ShutdownRegistry:
    """This process's registry (the one the handlers use), fresh, its lock a tripwire."""
    fresh = ShutdownRegistry()
    monkeypatch.setattr(shutdown_registry, "_registry", fresh)
    monkeypatch.setattr(shutdown_registry, "_registry_pid", os.getpid())
    monkeypatch.setattr(fresh, "_lock", Tripwire())
    return fresh


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def test_record_signal_takes_no_lock_and_logs_nothing(registry, logs):
    registry.record_signal(signal.SIGTERM)
    registry.record_signal(signal.SIGINT)

    assert registry.recorded_signal == signal.SIGTERM  # the first one
    assert not registry.shutting_down.is_set()
    assert logs.records == []


def test_the_recorded_signal_is_logged_by_begin_outside_the_handler(logs):
    registry = ShutdownRegistry(clock=lambda: 5.0)
    registry.record_signal(signal.SIGQUIT)

    registry.begin("detail")
    registry.close_all()

    assert [r.getMessage() for r in logs.records if r.name == "stopright"] == [
        "signal received: SIGQUIT", "graceful shutdown started (detail)", "shutdown complete in 0 ms"]


def test_the_wakeup_set_before_wait_is_not_lost():
    wakeup = stop_signals.Wakeup()

    assert wakeup.wait(0) is False
    wakeup.set()
    wakeup.set()
    assert wakeup.wait(0) is True
    assert wakeup.wait(0) is False  # used up


def test_celery_main_process_handler_only_records(registry, logs, monkeypatch):
    from stopright.worker_stop import WorkerStop

    monkeypatch.setattr(state, "should_stop", None)
    stop = WorkerStop(3.0)

    stop.on_signal(signal.SIGTERM, None)
    stop.on_signal(signal.SIGTERM, None)  # a repeat changes nothing
    stop.on_signal(signal.SIGINT, None)  # a second SIGINT: hand back now

    assert registry.recorded_signal == signal.SIGTERM
    assert state.should_stop == 0  # Celery's warm shutdown
    assert stop._again == signal.SIGINT
    assert stop._wakeup.wait(0)  # the watchdog would wake
    assert logs.records == []


def test_beat_handler_only_records_then_leaves_the_loop(registry, logs):
    from stopright.celery_beat import _stop

    with pytest.raises(SystemExit):
        _stop(registry, signal.SIGTERM, None)
    assert _stop(registry, signal.SIGINT, None) is None  # a repeat: no second SystemExit

    assert registry.recorded_signal == signal.SIGTERM
    assert logs.records == []


def test_a_signal_while_the_main_thread_holds_the_registry_lock_does_not_deadlock():
    """A real signal, a real lock: the gunicorn worker's handlers (chain_signal + report_signals).

    Before, the handler took the lock the interrupted main thread held: the
    child hung until the timeout below.
    """
    script = textwrap.dedent("""
        import logging, os, signal, sys
        from stopright import registry as shutdown_registry
        from stopright import signals as stop_signals
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        registry = shutdown_registry.current()
        signal.signal(signal.SIGTERM, lambda *_: None)
        stop_signals.chain_signal(signal.SIGTERM, stop_signals.report_signals(registry))
        with registry._lock:
            os.kill(os.getpid(), signal.SIGTERM)
            print("handler returned", flush=True)
        assert registry.shutting_down.wait(10)
        registry.close_all()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          cwd=ROOT)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["handler returned", "signal received: SIGTERM", "graceful shutdown started"]
    assert re.fullmatch(r"shutdown complete in \d+ ms", lines[3]), lines
