"""The API's bounds and token on the real web process (gunicorn with the demo's config; issue 14).

Without them anyone who reaches the API pins every pool child for an hour (a
``sleep`` of 3,600 s was accepted) or every web thread with long polls. The
Flask-level rules are in tests/unit/test_api_limits.py; here the settings reach
gunicorn's workers from the environment, as in production.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.procset import ProcessSet

GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"]
TOKEN = "a-token-of-more-than-16"


def test_bounds_and_token_hold_in_the_web_process(tmp_path: Path) -> None:
    ps = ProcessSet(tmp_path, command=GUNICORN,
                    env={"API_TOKEN": TOKEN, "JOB_MAX_SECONDS": "60", "API_MAX_WAIT_SECONDS": "5"})
    try:
        ps.start()
        deadline = time.monotonic() + 30
        while ps.http("GET", "/healthz").status != 200:  # a probe needs no token
            assert time.monotonic() < deadline, ps.output
            time.sleep(0.05)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        hour = {"task": "sleep", "args": {"seconds": 3600}}

        assert ps.http("POST", "/jobs", hour).status == 401
        assert ps.http("POST", "/jobs", hour, headers={"Authorization": "Bearer wrong"}).status == 401
        too_long = ps.http("POST", "/jobs", hour, headers=auth)
        assert too_long.status == 400 and "JOB_MAX_SECONDS" in too_long.body["error"]["message"], too_long
        accepted = ps.http("POST", "/jobs", {"task": "sleep", "args": {"seconds": 60}}, headers=auth)
        assert accepted.status == 202, accepted  # stored; no worker runs here
        job = accepted.body["id"]
        assert ps.http("GET", f"/jobs/{job}?wait=6", headers=auth).status == 400  # over API_MAX_WAIT
        assert ps.http("GET", f"/jobs/{job}", headers=auth).body["status"] == "queued"
        assert TOKEN not in ps.output
    finally:
        ps.cleanup()
