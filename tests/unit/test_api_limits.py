"""What one client may ask of the set: bounded jobs and long polls, an optional API token (issue 14).

Without bounds, anyone who reaches the API pins every pool child for an
hour (a ``sleep`` of 3,600 s) or every web thread with long polls.
"""

from __future__ import annotations

import pytest

import core.config
from jobs import ledger
from tests.unit.api_helpers import assert_json_error, submit

TOKEN = "t0ken-of-sixteen-chars"


@pytest.fixture
def settings(monkeypatch, var_dir):
    """Set environment variables, then rebuild the settings (the app reads them per request)."""

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        core.config.get_settings.cache_clear()

    return set_env


def test_a_sleep_longer_than_job_max_seconds_is_a_json_400_and_nothing_is_stored(client, publish):
    message = assert_json_error(client.post("/jobs", json={"task": "sleep", "args": {"seconds": 301}}), 400)

    assert "JOB_MAX_SECONDS" in message
    assert publish.calls == []


def test_job_max_seconds_is_a_setting(settings, client):
    settings(JOB_MAX_SECONDS="5")

    assert_json_error(client.post("/jobs", json={"task": "sleep", "args": {"seconds": 5.5}}), 400)
    assert submit(client, {"task": "sleep", "args": {"seconds": 5}})["args"] == {"seconds": 5}


def test_a_job_accepted_before_the_bound_was_lowered_still_runs():
    """The bound is the API's: the worker validates a stored job's args without it."""
    from jobs.kinds import SleepArgs

    assert SleepArgs.model_validate({"seconds": 600}).seconds == 600
    with pytest.raises(ValueError, match="JOB_MAX_SECONDS"):
        SleepArgs.model_validate({"seconds": 600}, context={"job_max_seconds": 300})


def test_a_long_poll_over_api_max_wait_seconds_is_a_json_400(settings, client):
    settings(API_MAX_WAIT_SECONDS="2")
    job_id = submit(client)["id"]

    message = assert_json_error(client.get(f"/jobs/{job_id}?wait=2.5"), 400)
    assert message.startswith("wait: ") and "API_MAX_WAIT_SECONDS" in message
    ledger.claim(job_id, lease=30, max_attempts=5)
    ledger.succeed(job_id, 1, None)  # finished: wait=2 answers at once
    assert client.get(f"/jobs/{job_id}?wait=2").status_code == 200


def test_without_api_token_the_api_is_open(client):
    assert client.get("/jobs/unknown").status_code == 404


def test_with_api_token_every_route_but_the_probes_needs_it(settings, client, broker_up):
    settings(API_TOKEN=TOKEN)

    for response in (client.post("/jobs", json={"task": "echo", "args": {"value": 1}}),
                     client.get("/jobs/unknown"),
                     client.get("/jobs/unknown", headers={"Authorization": "Bearer wrong-token-0123456"}),
                     client.get("/jobs/unknown", headers={"Authorization": f"Basic {TOKEN}"})):
        assert_json_error(response, 401)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    job = client.post("/jobs", json={"task": "echo", "args": {"value": 1}}, headers=auth)
    assert job.status_code == 202
    assert client.get(f"/jobs/{job.get_json()['id']}", headers=auth).status_code == 200


def test_an_empty_api_token_is_unset(settings, client):
    settings(API_TOKEN=" ")

    assert client.get("/jobs/unknown").status_code == 404


def test_a_short_api_token_stops_the_start_without_showing_it(monkeypatch, var_dir):
    monkeypatch.setenv("API_TOKEN", "short-secret")
    core.config.get_settings.cache_clear()

    with pytest.raises(SystemExit) as stop:
        core.config.get_settings()
    assert "API_TOKEN" in str(stop.value) and "short-secret" not in str(stop.value)
