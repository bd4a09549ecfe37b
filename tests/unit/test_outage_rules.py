"""What counts as an outage (core/outages.py), and how the API answers one (app/api.py)."""

from __future__ import annotations

import errno
import sqlite3

import psycopg
import pytest
from sqlalchemy import exc

from core import outages
from core.outages import DISK_FULL, UNREACHABLE
from jobs import ledger


def sqlite_error(message: str, code: int | None) -> exc.OperationalError:
    error = sqlite3.OperationalError(message)
    if code is not None:
        error.sqlite_errorcode = code
    return exc.OperationalError("INSERT INTO jobs ...", {}, error)


class DiskFullSqlstate(psycopg.OperationalError):
    sqlstate = "53100"


@pytest.mark.parametrize(("error", "kind"), [
    (exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused")), UNREACHABLE),
    (exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("terminating connection due to "
                                                                    "administrator command")), UNREACHABLE),
    (exc.InterfaceError("SELECT 1", {}, psycopg.InterfaceError("the connection is closed")), UNREACHABLE),
    (exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), UNREACHABLE),
    (exc.OperationalError("INSERT", {}, DiskFullSqlstate("could not extend file")), DISK_FULL),
    (sqlite_error("database or disk is full", sqlite3.SQLITE_FULL), DISK_FULL),
    (sqlite_error("database or disk is full", None), DISK_FULL),
    (sqlite_error("database is locked", sqlite3.SQLITE_BUSY), UNREACHABLE),
    (sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR | (3 << 8)), UNREACHABLE),  # an extended code
    (sqlite_error("unable to open database file", sqlite3.SQLITE_CANTOPEN), UNREACHABLE),
    (OSError(errno.ENOSPC, "No space left on device"), DISK_FULL),
])
def test_outages_are_recognised(error, kind):
    assert outages.database_outage(error) == kind


@pytest.mark.parametrize("error", [
    sqlite_error("no such table: jobs", sqlite3.SQLITE_ERROR),  # a bug, not an outage
    exc.IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")),
    exc.ProgrammingError("SELECT", {}, psycopg.ProgrammingError("syntax error")),
    ValueError("bad"),
    OSError(errno.EACCES, "Permission denied"),
])
def test_bugs_are_not_outages(error):
    assert outages.database_outage(error) is None


def test_a_nearly_full_directory_is_a_disk_problem(tmp_path, monkeypatch):
    assert outages.disk_problem(tmp_path) is None

    monkeypatch.setattr(outages, "MIN_FREE_BYTES", 2**62)  # more than any disk has

    assert "disk full" in outages.disk_problem(tmp_path)
    assert outages.disk_problem(tmp_path / "missing") is None


def test_redis_misconf_is_a_connection_error():
    import redis
    from redis._parsers.base import BaseParser

    outages.redis_refusals_are_connection_errors()
    error = BaseParser.parse_error("MISCONF Errors writing to the AOF file: No space left on device")

    assert isinstance(error, redis.ConnectionError)  # kombu reconnects instead of dying


# -- the API's answers --------------------------------------------------------------------------


def assert_outage_answer(response, status: int, word: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"]["status"] == status and word in body["error"]["message"]
    assert int(response.headers["Retry-After"]) > 0


@pytest.fixture
def down(monkeypatch):
    """Make the ledger's reads and writes raise ``error``."""
    def make(error: Exception) -> None:
        def raise_it(*_args, **_kwargs):
            raise error

        for name in ("create", "get"):
            monkeypatch.setattr(ledger, name, raise_it)

    return make


@pytest.mark.parametrize(("request_", "args"), [
    ("post", ("/jobs",)), ("get", ("/jobs/abc",)), ("get", ("/jobs/abc?wait=1",)),
])
def test_an_unreachable_database_is_a_503_with_retry_after(client, down, request_, args):
    down(exc.OperationalError("SELECT", {}, psycopg.OperationalError("connection refused")))

    response = getattr(client, request_)(*args, json={"task": "echo", "args": {"value": 1}}) \
        if request_ == "post" else client.get(*args)

    assert_outage_answer(response, 503, "database is unreachable")


def test_a_full_disk_under_the_database_is_a_507(client, down):
    down(sqlite_error("database or disk is full", sqlite3.SQLITE_FULL))

    response = client.post("/jobs", json={"task": "echo", "args": {"value": 1}})

    assert_outage_answer(response, 507, "disk")


def test_a_bug_is_still_a_500(client, down):
    down(exc.IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")))

    response = client.post("/jobs", json={"task": "echo", "args": {"value": 1}})

    assert response.status_code == 500
    assert response.get_json() == {"error": {"status": 500, "message": "internal error"}}


def test_readyz_says_the_disk_is_full(client, broker_up, monkeypatch):
    monkeypatch.setattr(outages, "MIN_FREE_BYTES", 2**62)

    response = client.get("/readyz")

    assert response.status_code == 503
    [reason] = response.get_json()["reasons"]
    assert reason.startswith("disk full: ")


def test_a_job_submitted_while_the_broker_is_known_down_is_not_published_inline(client, publish):
    publish.raises = ConnectionError("broker down")
    first = client.post("/jobs", json={"task": "echo", "args": {"value": 1}})
    second = client.post("/jobs", json={"task": "echo", "args": {"value": 2}})

    assert [first.status_code, second.status_code] == [202, 202]
    assert len(publish.calls) == 1  # the second one did not wait for the broker at all
    assert ledger.get(second.get_json()["id"])["unpublished_since"] is not None
