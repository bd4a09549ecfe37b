"""The stock web process: Flask as its quickstart writes it, Celery's result backend for status.

The same job API shape as the project (POST /jobs, GET /jobs/<id>, GET /healthz),
so one driver measures both. No lifecycle code: this is what the project is
compared against, not something to copy.
"""

from celery.result import AsyncResult
from flask import Flask, request
from reftasks import celery, run_job

app = Flask(__name__)

STATUS = {"PENDING": "queued", "RECEIVED": "queued", "RETRY": "queued", "STARTED": "running",
          "SUCCESS": "succeeded", "FAILURE": "failed", "REVOKED": "failed"}


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.post("/jobs")
def submit_job():
    body = request.get_json()
    result = run_job.delay(body["task"], body.get("args", {}))
    return {"id": result.id, "task": body["task"], "status": "queued"}, 202


@app.get("/jobs/<job_id>")
def get_job(job_id):
    result = AsyncResult(job_id, app=celery)
    return {"id": job_id, "status": STATUS.get(result.state, "queued")}
