"""``install()`` changes nothing silently: each Celery setting set, kept or refused, and why.

The worker's own start (the bootstep, the log lines, a conflict that stops it):
tests/e2e/test_user_shapes.py.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from celery import Celery

import stopright
from stopright import budget, settings
from stopright.checks import SettingsAtStart


def new_app() -> Celery:
    return Celery(f"settings-{uuid.uuid4().hex[:6]}", set_as_current=False)


class Worker:
    """What a worker bootstep gets: its app."""

    def __init__(self, app: Celery) -> None:
        self.app = app


def start(app: Celery) -> None:
    SettingsAtStart(Worker(app))


@pytest.mark.parametrize("read_first", [False, True], ids=["lazy", "configuration-read-before-install"])
def test_install_before_config_from_object_sets_what_the_app_leaves_unset(read_first: bool, caplog) -> None:
    app = new_app()
    if read_first:
        app.conf.timezone  # noqa: B018  (anything that reads the configuration loads it)
    stopright.install(app)
    app.config_from_object({"broker_url": "memory://", "task_ignore_result": True})
    with caplog.at_level(logging.INFO, logger="stopright"):
        start(app)
    assert {name: app.conf.get(name) for name in settings.SETTINGS} == {
        name: value for name, (value, _) in settings.SETTINGS.items()}
    assert app.conf.beat_scheduler == settings.BEAT_SCHEDULER
    assert app.conf.task_ignore_result is True  # the app's own settings stay
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert line.startswith("Celery settings set by stopright: task_acks_late=True (was False), ")
    assert "worker_prefetch_multiplier=1 (was 4)" in line and "beat_scheduler=" in line


def test_a_required_setting_the_app_sets_otherwise_stops_the_worker_naming_it() -> None:
    app = new_app()
    stopright.install(app)
    app.config_from_object({"broker_url": "memory://", "task_acks_late": False})
    with pytest.raises(ValueError, match=r"task_acks_late=False \(the app's; stopright needs True: "):
        start(app)
    assert app.conf.task_acks_late is False  # never overridden behind the app's back


def test_a_required_setting_changed_after_the_load_is_caught_at_start() -> None:
    app = new_app()
    stopright.install(app)
    app.conf.timezone  # noqa: B018  (loaded: a change now is not re-applied over by a reload)
    app.conf.task_reject_on_worker_lost = False
    with pytest.raises(ValueError, match=r"task_reject_on_worker_lost=False \(the app's"):
        start(app)


def test_the_apps_own_value_of_another_setting_is_kept_and_said(caplog) -> None:
    app = new_app()
    stopright.install(app)
    app.conf.update(worker_prefetch_multiplier=4, worker_soft_shutdown_timeout=5.0)
    with caplog.at_level(logging.INFO, logger="stopright"):
        start(app)
    assert (app.conf.worker_prefetch_multiplier, app.conf.worker_soft_shutdown_timeout) == (4, 5.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "Celery setting worker_prefetch_multiplier=4 left as it is: the app's own (stopright would set 1: "
        "no reserved message waits in a stopping worker's memory)",
        "Celery setting worker_soft_shutdown_timeout=5.0 left as it is: the app's own (stopright would "
        "set 0: a soft shutdown sleeps its whole timeout; the grace bounds stops)"]


def test_keep_leaves_a_setting_alone_and_says_so(caplog) -> None:
    app = new_app()
    stopright.install(app, keep=("worker_prefetch_multiplier", "beat_scheduler"))
    with caplog.at_level(logging.INFO, logger="stopright"):
        start(app)
    assert app.conf.worker_prefetch_multiplier == 4  # Celery's default, untouched
    assert app.conf.beat_scheduler == settings.DEFAULT_BEAT_SCHEDULER
    assert "Celery setting worker_prefetch_multiplier=4 left as it is: install(keep=...)" in caplog.text
    assert app.conf.task_acks_late is True


@pytest.mark.parametrize(("keep", "error"), [
    (("task_acks_late",), r"keep: task_acks_late cannot be kept: task_acks_late: a task cut short"),
    (("worker_prefech_multiplier",), r"keep: worker_prefech_multiplier: not a setting stopright changes"),
    ("worker_prefetch_multiplier", r"a collection of setting names"),
])
def test_a_bad_keep_is_a_value_error(keep, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        stopright.install(new_app(), keep=keep)


@pytest.mark.parametrize(("how", "error"), [
    ({"grace": -1}, r"GRACE=-1: must be more than 0"),
    ({"env": "soon"}, r"SHUTDOWN_GRACE_SECONDS='soon': not a number of seconds"),
])
def test_a_bad_grace_is_a_value_error_at_install(how, error: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if "env" in how:
        monkeypatch.setenv("SHUTDOWN_GRACE_SECONDS", how["env"])
    budget.current.cache_clear()
    try:
        with pytest.raises(ValueError, match=error):
            stopright.install(new_app(), grace=how.get("grace"))
    finally:
        budget.configure()  # nothing configured: the next reads the environment again
        budget._configured.clear()
        budget.current.cache_clear()
