"""Fixtures for the unit tests: one private var/ dir, fresh settings, engine and registry.

Nothing here starts a process or talks to a broker: publishing (``celery_app.send_task``)
and the broker ping are replaced. The real broker is covered by tests/e2e.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from typing import Any

import pytest

import core.config
import core.db
import stopright.registry
from tests.unit.shutdown_helpers import LOGGER, FakeClock


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    """Every test starts and ends with no process registry (``current()`` builds a new one), and
    the stop signals' handlers as they were (a stop's ``close_all`` makes them ignored)."""
    handlers = {signum: signal.getsignal(signum) for signum in stopright.registry.STOP_SIGNALS}
    stopright.registry._registry = None
    stopright.registry._registry_pid = None
    yield
    stopright.registry._registry = None
    stopright.registry._registry_pid = None
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def no_relay_left() -> Iterator[None]:
    """A test that started this process's outbox relay (a thread) leaves it stopped."""
    yield
    import sys

    outbox = sys.modules.get("jobs.outbox")
    if outbox is not None and outbox._relay is not None:
        outbox._relay.stop()
        outbox._relay = None


@pytest.fixture
def var_dir(tmp_path, monkeypatch) -> Iterator[Any]:
    """VAR_DIR points at tmp_path (so SQLite lives there); settings and engine start fresh."""
    monkeypatch.setenv("VAR_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    for name in ("REDIS_URL", "BROKER_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    core.config.get_settings.cache_clear()
    core.db.close()
    core.db._engine = None
    yield tmp_path
    core.db.close()
    core.db._engine = None
    core.config.get_settings.cache_clear()


@pytest.fixture
def schema(var_dir) -> None:
    """The jobs table exists in this test's SQLite file."""
    from jobs import ledger

    ledger.ensure_schema()


class Recorder:
    """Stands in for ``celery_app.send_task``: records every call, optionally raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.raises: BaseException | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))
        if self.raises is not None:
            raise self.raises

    @property
    def published_args(self) -> list[Any]:
        """The arguments of every message published for the worker's job task (by its name)."""
        assert all(args[0] == "jobs.run" for args, _ in self.calls), self.calls
        return [kwargs.get("args", args[1] if len(args) > 1 else None) for args, kwargs in self.calls]


@pytest.fixture
def publish(monkeypatch) -> Recorder:
    from core.celery_app import celery_app

    recorder = Recorder()
    monkeypatch.setattr(celery_app, "send_task", recorder)
    return recorder


@pytest.fixture
def flask_app(var_dir, publish):
    from app import create_app

    # TESTING: an unexpected exception propagates into the test instead of becoming a 500.
    return create_app({"TESTING": True})


@pytest.fixture
def client(flask_app):
    return flask_app.test_client()


@pytest.fixture
def broker_up(monkeypatch) -> None:
    import core.broker

    monkeypatch.setattr(core.broker, "ping", lambda: True)


@pytest.fixture
def broker_down(monkeypatch) -> None:
    import core.broker

    monkeypatch.setattr(core.broker, "ping", lambda: False)


# -- for test_shutdown_registry.py, test_shutdown_log.py, test_stopright_signals.py --------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock) -> stopright.registry.ShutdownRegistry:
    """A registry of its own (not the process's ``current()``), on a clock the test moves."""
    return stopright.registry.ShutdownRegistry(clock=clock)


@pytest.fixture
def shutdown_logs(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog
