"""What the shutdown registry tests share: a clock a test moves, the registry's log lines.

(test_shutdown_registry.py, test_shutdown_log.py, test_stopright_signals.py; their fixtures
``clock``, ``registry`` and ``shutdown_logs`` are in tests/unit/conftest.py.)
"""

from __future__ import annotations

LOGGER = "stopright"


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
