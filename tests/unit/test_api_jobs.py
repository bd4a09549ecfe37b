"""The jobs API contract (app/api.py: POST /jobs, GET /jobs/<id>), publishing replaced.

Requests the API refuses: test_api_rejects.py; /healthz and /readyz: test_api_health.py.
"""

from __future__ import annotations

import json

import pytest

from jobs import ledger
from stopright import registry as shutdown_registry
from tests.unit.api_helpers import ISO_UTC_MS, JOB_KEYS, SLEEP_1, assert_json_error, submit

# -- submitting jobs --------------------------------------------------------------------


def test_submit_accepts_a_sleep_job_and_publishes_its_id(client, publish):
    response = client.post("/jobs", json=SLEEP_1)

    assert response.status_code == 202
    body = response.get_json()
    assert isinstance(body["id"], str) and body["id"]
    assert body["status"] == "queued"
    assert body["task"] == "sleep"
    assert body["args"] == {"seconds": 1}
    assert body["attempts"] == 0
    assert response.headers["Location"] == f"/jobs/{body['id']}"
    assert publish.published_args == [[body["id"]]]


def test_submit_publishes_without_kombu_retries(client, publish):
    # A down broker must not stall the request: the outbox relay republishes instead.
    submit(client)

    [(_, kwargs)] = publish.calls
    assert kwargs["retry"] is False


def test_each_submit_gets_its_own_id(client, publish):
    ids = {submit(client)["id"] for _ in range(3)}

    assert len(ids) == 3
    assert sorted(args[0] for args in publish.published_args) == sorted(ids)


@pytest.mark.parametrize("value", [
    None,
    0,
    -1.5,
    "text",
    "",
    True,
    [],
    {},
    [1, "two", None, {"three": [3.0]}],
    {"nested": {"deeper": {"list": [True, False, None], "s": "ü∑ 😀"}}},
], ids=repr)
def test_echo_accepts_any_json_value(client, publish, value):
    body = submit(client, {"task": "echo", "args": {"value": value}})

    assert body["args"] == {"value": value}
    stored = client.get(f"/jobs/{body['id']}").get_json()
    assert stored["args"] == {"value": value}
    assert publish.published_args == [[body["id"]]]


def test_a_failing_publish_still_accepts_and_stores_the_job(client, publish, caplog):
    publish.raises = ConnectionError("broker is down")

    response = client.post("/jobs", json=SLEEP_1)

    assert response.status_code == 202
    job_id = response.get_json()["id"]
    assert len(publish.calls) == 1
    stored = client.get(f"/jobs/{job_id}")
    assert stored.status_code == 200
    assert stored.get_json()["status"] == "queued"
    assert any(job_id in r.getMessage() and r.name == "outbox" for r in caplog.records)
    assert ledger.get(job_id)["unpublished_since"] is not None  # the outbox: published later


def test_submitted_job_is_in_the_ledger(client):
    job_id = submit(client)["id"]

    row = ledger.get(job_id)

    assert row is not None
    assert row["status"] == ledger.QUEUED
    assert row["args"] == {"seconds": 1.0}


# -- reading jobs ---------------------------------------------------------------------------


def test_get_job_returns_exactly_the_public_fields(client):
    job_id = submit(client)["id"]

    response = client.get(f"/jobs/{job_id}")

    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == JOB_KEYS
    assert body["id"] == job_id
    assert body["status"] == "queued"
    assert body["result"] is None and body["error"] is None
    assert ISO_UTC_MS.fullmatch(body["created_at"])
    assert body["started_at"] is None and body["finished_at"] is None


def test_submit_answer_has_the_same_fields_as_get(client):
    body = submit(client)

    assert set(body) == JOB_KEYS
    assert client.get(f"/jobs/{body['id']}").get_json() == body


def test_get_finished_job_shows_result_and_times(client):
    job_id = submit(client, {"task": "echo", "args": {"value": {"a": 1}}})["id"]
    claimed = ledger.claim(job_id, lease=30, max_attempts=5)
    assert ledger.succeed(job_id, claimed["attempts"], {"a": 1})

    body = client.get(f"/jobs/{job_id}").get_json()

    assert body["status"] == "succeeded"
    assert body["attempts"] == 1
    assert body["result"] == {"a": 1}
    assert ISO_UTC_MS.fullmatch(body["started_at"])
    assert ISO_UTC_MS.fullmatch(body["finished_at"])


def test_get_unknown_job_is_a_json_404(client):
    message = assert_json_error(client.get("/jobs/0123456789abcdef0123456789abcdef"), 404)

    assert "0123456789abcdef0123456789abcdef" in message


def test_wait_on_a_queued_job_returns_it_still_queued(client):
    job_id = submit(client)["id"]

    response = client.get(f"/jobs/{job_id}?wait=0.2")

    assert response.status_code == 200
    assert response.get_json()["status"] == "queued"


@pytest.mark.timeout(10)
def test_wait_on_a_finished_job_answers_at_once(client):
    job_id = submit(client)["id"]
    claimed = ledger.claim(job_id, lease=30, max_attempts=5)
    ledger.fail(job_id, claimed["attempts"], "ValueError: nope")

    body = client.get(f"/jobs/{job_id}?wait=30").get_json()  # would hit the timeout if it waited

    assert body["status"] == "failed"
    assert body["error"] == "ValueError: nope"


@pytest.mark.timeout(10)
def test_wait_answers_at_once_with_the_current_state_when_shutting_down(client):
    job_id = submit(client)["id"]
    shutdown_registry.current().begin()

    response = client.get(f"/jobs/{job_id}?wait=30")  # would hit the timeout if it waited

    assert response.status_code == 200
    assert response.get_json()["status"] == "queued"


@pytest.mark.parametrize("wait", ["0", "0.0", "30", "1e-3"])
def test_wait_accepts_zero_to_thirty_seconds(client, wait):
    job_id = submit(client)["id"]
    ledger.claim(job_id, lease=30, max_attempts=5)
    ledger.succeed(job_id, 1, None)  # finished: even wait=30 answers at once

    assert client.get(f"/jobs/{job_id}?wait={wait}").status_code == 200


@pytest.mark.parametrize("wait", ["31", "30.001", "-1", "abc", "", "nan", "inf"])
def test_wait_out_of_range_or_not_a_number_is_a_json_400(client, wait):
    job_id = submit(client)["id"]

    message = assert_json_error(client.get(f"/jobs/{job_id}?wait={wait}"), 400)

    assert message.startswith("wait: ")


def test_wait_is_validated_before_the_job_is_looked_up(client):
    assert_json_error(client.get("/jobs/unknown?wait=abc"), 400)


# -- answers ------------------------------------------------------------------------------


def test_json_answers_have_sorted_keys(client):
    """Flask's default (the JSON_SORT_KEYS setting went in Flask 2.3): stable, diffable answers."""
    job = submit(client)
    response = client.get(f"/jobs/{job['id']}")

    keys = json.loads(response.data, object_pairs_hook=lambda pairs: [key for key, _ in pairs])
    assert keys == sorted(JOB_KEYS)
