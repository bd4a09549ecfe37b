"""The job API: the same shape as tools/bench/reference (POST /jobs, GET /jobs/<id>, GET /healthz)."""

import uuid

from celery.result import AsyncResult
from flask import Blueprint, abort, request

from jobapp import tasks
from jobapp.models import Job, db

bp = Blueprint("jobs", __name__)

STATUS = {"PENDING": "queued", "RECEIVED": "queued", "RETRY": "queued", "STARTED": "running",
          "PROGRESS": "running", "SUCCESS": "succeeded", "FAILURE": "failed", "REVOKED": "failed"}


@bp.get("/healthz")
def healthz() -> dict[str, object]:
    return {"status": "ok"}


@bp.post("/jobs")
def submit_job() -> tuple[dict[str, object], int]:
    body = request.get_json()
    if body.get("task") not in ("sleep", "echo"):
        abort(400)
    job = Job(id=str(uuid.uuid4()), task=body["task"], args=body.get("args", {}))
    db.session.add(job)
    db.session.commit()
    tasks.run_job.apply_async((job.task, job.args), task_id=job.id)
    return {"id": job.id, "task": job.task, "status": "queued"}, 202


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> dict[str, object]:
    job = db.get_or_404(Job, job_id)
    result = AsyncResult(job_id)
    status = STATUS.get(result.state, "queued")
    progress = result.info if result.state == "PROGRESS" else None
    return {"id": job.id, "task": job.task, "status": status, "progress": progress,
            "result": job.result, "finished_at": job.finished_at and job.finished_at.isoformat()}
