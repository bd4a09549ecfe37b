"""What the API tests share (test_api_jobs.py, test_api_rejects.py, test_api_health.py)."""

from __future__ import annotations

import re

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
