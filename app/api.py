"""The HTTP API: health, readiness and jobs. Shapes are a contract; keep them.

Outages are answers, not crashes: a database that cannot be reached
is a 503 and a full disk under it a 507, each a JSON error with
``Retry-After`` (core/outages.py decides which is which); ``/readyz`` names
the reason. A broker that is down costs a ``POST /jobs`` nothing: the job
is stored and published when the broker is back (jobs/outbox.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from sqlalchemy import text
from werkzeug.exceptions import (
    BadRequest,
    ClientDisconnected,
    HTTPException,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
)

from core import broker, db, outages
from core.config import get_settings
from core.db import get_engine
from jobs import ledger, outbox
from jobs.kinds import KINDS
from stopright import registry

log = logging.getLogger("api")
bp = Blueprint("api", __name__)

POLL_SECONDS = 0.05
MAX_JSON_DEPTH = 64
#: Retry-After of a 503 or 507 for a database outage, in seconds.
RETRY_AFTER_SECONDS = 5
#: How long /readyz waits for the database (the broker's check has its own: core/broker.py).
READY_CHECK_SECONDS = 1.0


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    args: dict[str, JsonValue] = Field(default_factory=dict)


class WaitQuery(BaseModel):
    wait: float = Field(default=0, ge=0)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _json_body() -> Any:
    """The request's JSON, strictly (RFC 8259: no NaN/Infinity), or a clear 4xx."""
    if not request.is_json:
        raise UnsupportedMediaType("send the job as application/json")
    try:
        data = request.get_data(cache=False)
    except (OSError, ClientDisconnected) as error:  # broken framing (a bad chunk size...), or the
        raise BadRequest(f"the request body could not be read: {_first_cause(error)}") from None
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:
        raise BadRequest(f"the body is not valid JSON: {error}") from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def _first_cause(error: BaseException) -> BaseException:
    """The error at the root of a chain (werkzeug wraps the server's own read error)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return error


def _problem(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())


#: Routes a probe reaches without the API token.
OPEN_ENDPOINTS = ("api.healthz", "api.readyz")


@bp.before_app_request
def require_token() -> None:
    """With ``API_TOKEN`` set, every route but the probes needs ``Authorization: Bearer <token>``."""
    token = get_settings().api_token
    if token is None or request.endpoint in OPEN_ENDPOINTS:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.get_secret_value().encode()):
        raise Unauthorized("send the API token: Authorization: Bearer <token>")


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[dict[str, Any], int]:
    reasons = []
    if registry.current().shutting_down.is_set():
        reasons.append("shutting down")
    try:
        with db.deadline(READY_CHECK_SECONDS), get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        kind = outages.database_outage(exc)
        reasons.append(f"database: {type(exc).__name__}" + (f" ({kind})" if kind else ""))
    disk = outages.disk_problem(get_settings().data_dir)
    if disk:
        reasons.append(disk)
    if not broker.ping():
        reasons.append("broker: no answer")
    if reasons:
        return {"status": "unavailable", "reasons": reasons}, 503
    return {"status": "ready"}, 200


@bp.post("/jobs")
def submit_job() -> tuple[Response, int]:
    body = _json_body()
    try:
        job_request = JobRequest.model_validate(body)
    except ValidationError as error:
        raise BadRequest(_problem(error)) from None
    if job_request.task not in KINDS:
        raise BadRequest(f"unknown task {job_request.task!r}; known: {', '.join(sorted(KINDS))}")
    model, _run = KINDS[job_request.task]
    try:
        args = model.model_validate(job_request.args, context=_limits()).model_dump(mode="json")
    except ValidationError as error:
        raise BadRequest(f"args: {_problem(error)}") from None

    marked = outbox.broker_known_down()  # then the relay publishes it; no wait for the broker here
    job = ledger.create(job_request.task, args, unpublished=marked)
    outbox.send(job["id"], marked=marked)
    response = jsonify(ledger.public(job))
    response.headers["Location"] = url_for("api.get_job", job_id=job["id"])
    return response, 202


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    try:
        wait = WaitQuery.model_validate(request.args.to_dict()).wait
    except ValidationError as error:
        raise BadRequest(_problem(error)) from None
    limit = get_settings().api_max_wait_seconds
    if wait > limit:
        raise BadRequest(f"wait: at most {limit:g} seconds here (API_MAX_WAIT_SECONDS)")
    job = ledger.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    deadline = time.monotonic() + wait
    stopping = registry.current().shutting_down
    # Long poll; a shutdown answers at once with the current state.
    while job["status"] not in ledger.FINISHED and time.monotonic() < deadline:
        if stopping.wait(POLL_SECONDS):
            break
        job = ledger.get(job_id) or job
    return ledger.public(job)


def _limits() -> dict[str, float]:
    """What the job kinds check an API request against (jobs/kinds.py), from the settings."""
    return {"job_max_seconds": get_settings().job_max_seconds}


@bp.app_errorhandler(HTTPException)
def http_error(error: HTTPException) -> tuple[Response, int]:
    code = error.code or 500
    response = jsonify({"error": {"status": code, "message": error.description}})
    if code == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response, code


@bp.app_errorhandler(Exception)
def server_error(error: Exception) -> tuple[Response, int]:
    """An outage (503, 507: logged in one line, the client told when to retry) or a bug (500)."""
    kind = outages.database_outage(error)
    if kind is None:
        log.exception("unhandled error", exc_info=error)
        return jsonify({"error": {"status": 500, "message": "internal error"}}), 500
    code = 507 if kind == outages.DISK_FULL else 503
    log.warning("%s %s: %d, database %s (%s)", request.method, request.path, code, kind,
                type(getattr(error, "orig", None) or error).__name__)
    response = jsonify({"error": {"status": code, "message": outages.describe(kind)}})
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response, code
