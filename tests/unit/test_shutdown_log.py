"""The lines ShutdownRegistry (stopright/registry.py) logs: the shutdown story, in order, once.

Every stop is read from these lines (tests/e2e/checks.py ``assert_shutdown_sequence``, the
shutdown report). The fixtures ``clock``, ``registry`` and ``shutdown_logs``: tests/unit/conftest.py.
"""

from __future__ import annotations

import logging
import re
import signal

from tests.unit.shutdown_helpers import messages

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


def test_closed_log_line_reports_whole_milliseconds(registry, clock, shutdown_logs):
    registry.register("db", lambda: clock.advance(0.0126))

    registry.close_all()

    closed = [m for m in messages(shutdown_logs) if m.startswith("closed db")]
    assert closed == ["closed db in 13 ms"]
    assert re.fullmatch(r"shutdown complete in \d+ ms", messages(shutdown_logs)[-1])
