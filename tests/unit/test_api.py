"""The HTTP API contract (app/api.py), with publishing and the broker ping replaced."""

from __future__ import annotations

import json
import re

import pytest

from app import shutdown
from jobs import ledger

JOB_KEYS = {"id", "task", "args", "status", "attempts", "result", "error",
            "created_at", "started_at", "finished_at"}
ISO_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SLEEP_1 = {"task": "sleep", "args": {"seconds": 1}}


def assert_json_error(response, status: int) -> str:
    """An error answer: the given status, a JSON body ``{"error": {status, message}}``."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"]["status"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def submit(client, body=SLEEP_1):
    response = client.post("/jobs", json=body)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


# -- health and readiness -------------------------------------------------------------


def test_healthz_is_ok(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_healthz_stays_ok_while_shutting_down(client):
    shutdown.current().begin()

    assert client.get("/healthz").status_code == 200


def test_readyz_is_ready_when_database_and_broker_answer(client, broker_up):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ready"}


def test_readyz_is_unavailable_when_the_broker_does_not_answer(client, broker_down):
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reasons": ["broker: no answer"]}


def test_readyz_is_unavailable_while_shutting_down(client, broker_up):
    shutdown.current().shutting_down.set()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reasons": ["shutting down"]}


def test_readyz_names_a_database_failure(client, broker_up, monkeypatch):
    import app.api

    class Unreachable:
        def connect(self):
            raise ConnectionRefusedError("no database")

    monkeypatch.setattr(app.api, "get_engine", lambda: Unreachable())

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json()["reasons"] == ["database: ConnectionRefusedError"]


def test_readyz_lists_every_reason(client, broker_down):
    shutdown.current().begin()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json()["reasons"] == ["shutting down", "broker: no answer"]


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
    shutdown.current().begin()

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


# -- rejected submissions -----------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    "{",
    '{"task": "sleep",}',
    "not json",
    "",
    "{'task': 'sleep'}",
    b'{"task": "echo", "args": {"value": "\xff"}}',
], ids=["unclosed", "trailing-comma", "bare-word", "empty", "single-quotes", "bad-utf8"])
def test_invalid_json_is_a_json_400(client, publish, data):
    response = client.post("/jobs", data=data, content_type="application/json")

    assert_json_error(response, 400)
    assert publish.calls == []


@pytest.mark.parametrize("body", [[], [SLEEP_1], "sleep", 42, True, None],
                         ids=["empty-list", "list", "string", "number", "bool", "null"])
def test_a_json_body_that_is_not_an_object_is_a_json_400(client, publish, body):
    response = client.post("/jobs", data=json.dumps(body), content_type="application/json")

    assert_json_error(response, 400)
    assert publish.calls == []


@pytest.mark.parametrize("body", [
    {},
    {"args": {"seconds": 1}},
    {"task": None},
    {"task": 1},
    {"task": "sleep", "args": [1]},
    {"task": "sleep", "args": "seconds=1"},
    {"task": "sleep", "args": {"seconds": 1}, "priority": "high"},
], ids=["empty", "no-task", "null-task", "number-task", "list-args", "string-args", "extra-key"])
def test_a_malformed_job_request_is_a_json_400(client, publish, body):
    assert_json_error(client.post("/jobs", json=body), 400)
    assert publish.calls == []


@pytest.mark.parametrize("task", ["nope", "SLEEP", "", "jobs.run"])
def test_an_unknown_task_is_a_json_400_naming_the_known_ones(client, publish, task):
    message = assert_json_error(client.post("/jobs", json={"task": task, "args": {}}), 400)

    assert repr(task) in message
    assert "echo, sleep" in message
    assert publish.calls == []


@pytest.mark.parametrize("args", [
    {"seconds": -1},
    {"seconds": 3601},
    {"seconds": "x"},
    {"seconds": None},
    {"seconds": [1]},
    {},
    {"seconds": 1, "extra": 2},
    {"secs": 1},
], ids=["negative", "over-an-hour", "string", "null", "list", "missing", "extra-key", "misspelt"])
def test_bad_sleep_args_are_a_json_400(client, publish, args):
    message = assert_json_error(client.post("/jobs", json={"task": "sleep", "args": args}), 400)

    assert message.startswith("args: ")
    assert publish.calls == []


@pytest.mark.parametrize("args", [{}, {"value": 1, "other": 2}], ids=["missing", "extra-key"])
def test_bad_echo_args_are_a_json_400(client, publish, args):
    assert_json_error(client.post("/jobs", json={"task": "echo", "args": args}), 400)
    assert publish.calls == []


@pytest.mark.parametrize("seconds", [0, 0.5, 3600])
def test_sleep_seconds_bounds_are_inclusive(client, seconds):
    body = submit(client, {"task": "sleep", "args": {"seconds": seconds}})

    assert body["args"] == {"seconds": seconds}


def test_nothing_is_stored_for_a_rejected_job(client, var_dir):
    from sqlalchemy import func, select

    from core.db import get_engine

    client.post("/jobs", json={"task": "sleep", "args": {"seconds": -1}})
    client.post("/jobs", json={"task": "nope"})

    with get_engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(ledger.jobs)).scalar() == 0


def test_a_body_over_64_kib_is_a_json_413(client, publish):
    padding = "x" * (64 * 1024)
    response = client.post("/jobs", json={"task": "echo", "args": {"value": padding}})

    assert_json_error(response, 413)
    assert publish.calls == []


def test_a_body_just_under_64_kib_is_accepted(client):
    value = "x" * (64 * 1024 - 100)
    data = json.dumps({"task": "echo", "args": {"value": value}})
    assert len(data.encode()) <= 64 * 1024

    response = client.post("/jobs", data=data, content_type="application/json")

    assert response.status_code == 202


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_that_is_not_declared_json_is_a_json_415(client, publish, content_type):
    response = client.post("/jobs", data=json.dumps(SLEEP_1), content_type=content_type)

    assert_json_error(response, 415)
    assert publish.calls == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "application/problem+json"])
def test_json_content_type_variants_are_accepted(client, content_type):
    response = client.post("/jobs", data=json.dumps(SLEEP_1), content_type=content_type)

    assert response.status_code == 202


# -- errors are JSON, never HTML, never 500 ----------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nope", 404),
    ("GET", "/jobs", 405),
    ("DELETE", "/jobs/abc", 405),
    ("PUT", "/jobs", 405),
    ("POST", "/healthz", 405),
])
def test_routing_errors_are_json(client, method, path, status):
    response = client.open(path, method=method)

    assert_json_error(response, status)
    assert b"<html" not in response.data.lower()


@pytest.mark.parametrize(("kwargs", "status"), [
    ({"data": "{", "content_type": "application/json"}, 400),
    ({"json": [1]}, 400),
    ({"json": {"task": "nope"}}, 400),
    ({"json": {"task": "sleep", "args": {"seconds": 3601}}}, 400),
    ({"data": "x" * (64 * 1024 + 1), "content_type": "application/json"}, 413),
    ({"data": "{}", "content_type": "text/plain"}, 415),
])
def test_submit_errors_are_json_not_html(client, kwargs, status):
    response = client.post("/jobs", **kwargs)

    assert_json_error(response, status)
    assert b"<html" not in response.data.lower()


def test_deeply_nested_json_under_the_size_limit_is_a_400_not_a_500(client):
    data = "[" * 60_000  # 60 KB: under MAX_BODY_BYTES

    response = client.post("/jobs", data=data, content_type="application/json")

    assert_json_error(response, 400)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_answers_are_strict_json_even_for_nan_input(client, token):
    data = '{"task": "echo", "args": {"value": ' + token + "}}"

    response = client.post("/jobs", data=data, content_type="application/json")

    assert_json_error(response, 400)  # NaN/Infinity are not JSON (RFC 8259)

    def reject(constant):
        raise ValueError(constant)

    json.loads(response.get_data(as_text=True), parse_constant=reject)


def test_readyz_after_the_registry_closed_is_503_not_500(client, monkeypatch):
    # A request racing the shutdown: the redis client was already closed.
    import app.shutdown

    app.shutdown.current().close_all()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert "shutting down" in response.get_json()["reasons"]


def test_json_answers_have_sorted_keys(client):
    """Flask's default (the JSON_SORT_KEYS setting went in Flask 2.3): stable, diffable answers."""
    job = submit(client)
    response = client.get(f"/jobs/{job['id']}")

    keys = json.loads(response.data, object_pairs_hook=lambda pairs: [key for key, _ in pairs])
    assert keys == sorted(JOB_KEYS)
