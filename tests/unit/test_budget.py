"""The stop budget against each known manager's SIGKILL window (stopright/budget.py)."""

from __future__ import annotations

import pytest

from broker import launcher
from stopright import budget, worker_stop

HONCHO = "/venv/bin/python /venv/bin/honcho start"


def settings(grace: float = 3.0, drain: float = 0.0) -> tuple[float, float]:
    return grace, drain


def test_no_manager_known_keeps_the_settings_as_they_are():
    fitted = budget.fit(*settings(25, 10), {})
    assert (fitted.grace, fitted.drain, fitted.manager, fitted.warnings) == (25, 10, None, ())


def test_under_honcho_a_long_grace_is_cut_to_fit_its_5_s_kill_and_says_so():
    # One container with honcho as PID 1 and the Kubernetes grace of 25 s: honcho
    # SIGKILLs everything 5 s after the first process (beat) exits.
    fitted = budget.fit(*settings(25, 6), {"HONCHO_PROCESS_NAME": "worker.1"}, HONCHO)
    assert (fitted.grace, fitted.drain) == (3, 4)
    assert fitted.stop_timeout <= budget.HONCHO_KILL_WAIT
    assert len(fitted.warnings) == 2
    expected = "SHUTDOWN_GRACE_SECONDS=25 does not fit honcho's SIGKILL 5 s into a stop: using 3 s"
    assert expected in fitted.warnings


def test_the_default_grace_fits_honcho_without_a_warning():
    fitted = budget.fit(*settings(), {"HONCHO_PROCESS_NAME": "web.1"}, HONCHO)
    assert (fitted.grace, fitted.warnings) == (3, ())


def test_heroku_allows_its_30_s():
    assert budget.fit(*settings(25), {"DYNO": "worker.1"}).warnings == ()
    fitted = budget.fit(*settings(29), {"DYNO": "worker.1"})
    assert fitted.grace == 28 and fitted.stop_timeout <= budget.HEROKU_KILL_WAIT


def test_foreman_only_warns_its_t_flag_cannot_be_seen():
    fitted = budget.fit(*settings(10), {"PS": "worker.1"}, "/usr/bin/ruby3.1 /usr/bin/foreman start")
    assert fitted.grace == 10
    assert fitted.warnings and "-t 13" in fitted.warnings[0]


@pytest.mark.parametrize("environ", [{"HONCHO_PROCESS_NAME": "x"}, {"DYNO": "x"}])
def test_what_the_worker_needs_after_the_grace_is_what_its_phases_take(environ):
    # The budget's overhead must cover stopright/worker_stop.py's phase deadlines.
    phases = worker_stop.HANDBACK_SECONDS + worker_stop.POOL_EXIT_SECONDS + worker_stop.CLOSE_SECONDS
    assert phases <= budget.WORKER_AFTER_GRACE
    fitted = budget.fit(*settings(1000), environ, HONCHO)
    assert fitted.stop_timeout <= budget.detect_manager(environ, HONCHO).kill_after


@pytest.mark.parametrize(("environ", "manager"), [
    ({"HONCHO_PROCESS_NAME": "worker.1"}, "/usr/bin/python3 /usr/bin/supervisord -n"),  # honcho export
    ({"PS": "worker.1"}, "/usr/lib/systemd/systemd --system"),  # foreman export systemd
])
def test_an_exports_leftover_variable_under_another_manager_cuts_nothing(environ, manager):
    fitted = budget.fit(*settings(25), environ, manager)
    assert (fitted.grace, fitted.manager, fitted.warnings) == (25, None, ())


def test_the_broker_waits_for_the_longest_of_the_worker_and_the_draining_web():
    assert launcher.linger_seconds(budget.fit(*settings(3, 0), {})) == 3 + launcher.LINGER_MARGIN
    assert launcher.linger_seconds(budget.fit(*settings(3, 10), {})) == 10 + budget.WEB_AFTER_DRAIN


def test_the_broker_waits_for_redis_servers_save_longer_where_the_manager_allows():
    under_honcho = budget.fit(*settings(), {"HONCHO_PROCESS_NAME": "broker.1"}, HONCHO)
    assert launcher.save_wait_seconds(under_honcho) == launcher.SAVE_WAIT_SHORT  # inside honcho's 5 s
    # systemd: KillMode=mixed kills what is left once the launcher exits
    assert launcher.save_wait_seconds(budget.fit(*settings(), {})) == launcher.SAVE_WAIT_LONG


def test_the_settings_come_from_the_environment_and_a_bad_one_stops_the_start(monkeypatch):
    monkeypatch.setenv("SHUTDOWN_GRACE_SECONDS", "7")
    monkeypatch.setenv("SHUTDOWN_DRAIN_SECONDS", "2")
    budget.current.cache_clear()
    try:
        assert (budget.current().grace, budget.current().drain) == (7, 2)
        monkeypatch.setenv("SHUTDOWN_GRACE_SECONDS", "soon")
        budget.current.cache_clear()
        with pytest.raises(ValueError, match="SHUTDOWN_GRACE_SECONDS='soon': not a number"):
            budget.current()
        monkeypatch.setenv("SHUTDOWN_GRACE_SECONDS", "0")
        budget.current.cache_clear()
        with pytest.raises(ValueError, match="must be more than 0"):
            budget.current()
    finally:
        budget.current.cache_clear()
