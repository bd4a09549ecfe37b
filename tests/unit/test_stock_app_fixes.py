"""What the stock app (examples/foreign) needed from stopright, with no line of its own.

A stock Celery worker and beat keep Celery's ``worker_redirect_stdouts``:
``sys.stderr`` is a ``LoggingProxy`` without a file descriptor, where the
stack dumps' registration failed (pool children and beat crashed at start).
A hand-back's ``Reject`` came with a traceback per running task. The
gunicorn side (stopright's lines in gunicorn's log) is checked with a real
gunicorn in tests/e2e/test_gunicorn_hooks_atexit.py.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
from collections.abc import Iterator

import pytest
from celery.exceptions import Reject
from celery.utils.log import LoggingProxy

from stopright import celery_worker, signals
from stopright.handback import HANDED_BACK, QuietHandBack


@pytest.fixture
def no_stack_dumps() -> Iterator[None]:
    yield
    faulthandler.unregister(signals.STACK_DUMP_SIGNAL)


def test_stack_dumps_register_where_stderr_is_celerys_logging_proxy(monkeypatch: pytest.MonkeyPatch,
                                                                   no_stack_dumps: None) -> None:
    proxy = LoggingProxy(logging.getLogger("test-proxy"))
    monkeypatch.setattr(sys, "stderr", proxy)
    with pytest.raises(AttributeError):
        proxy.fileno()  # what failed before
    signals.enable_stack_dumps()  # registers on file descriptor 2 instead of raising
    assert faulthandler.unregister(signals.STACK_DUMP_SIGNAL)


def record_with(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:  # noqa: BLE001
        exc_info = sys.exc_info()
    return logging.LogRecord("celery.app.trace", logging.WARNING, __file__, 1, "Task x reject", (), exc_info)


def test_a_hand_back_is_logged_without_its_traceback() -> None:
    record = record_with(Reject(HANDED_BACK, requeue=True))
    assert QuietHandBack().filter(record)
    assert record.exc_info is None
    assert "Traceback" not in logging.Formatter().format(record)


@pytest.mark.parametrize("error", [Reject("bad payload", requeue=False), ValueError(HANDED_BACK)])
def test_other_errors_keep_their_traceback(error: BaseException) -> None:
    record = record_with(error)
    assert QuietHandBack().filter(record)
    assert "Traceback" in logging.Formatter().format(record)


def test_a_starting_worker_quiets_celerys_trace_logger() -> None:
    celery_worker.wire()  # what celeryd_init runs (install() connects it)
    assert any(isinstance(f, QuietHandBack) for f in logging.getLogger("celery.app.trace").filters)
