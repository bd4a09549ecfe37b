"""Malformed input to the jobs API (app/api.py): a JSON 4xx, nothing stored or published, never a 500.

(The same over a real socket, with gunicorn: tests/e2e/test_malformed_http.py.)
"""

from __future__ import annotations

import json

import pytest

from jobs import ledger
from tests.unit.api_helpers import SLEEP_1, assert_json_error, submit

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


@pytest.mark.parametrize("seconds", [0, 0.5, 300])  # 300: JOB_MAX_SECONDS's default
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
