"""The tasks, defined with ``@shared_task`` as the Flask docs do."""

import time

from celery import Task, shared_task

from jobapp.models import Job, db, now


@shared_task(bind=True, ignore_result=False)
def run_job(self: Task, task: str, args: dict) -> object:
    job = db.session.get(Job, self.request.id)
    if task == "sleep":
        total = float(args["seconds"])
        started = time.monotonic()
        while (done := time.monotonic() - started) < total:
            self.update_state(state="PROGRESS", meta={"current": round(done, 1), "total": total})
            time.sleep(min(0.5, total - done))
        result = {"slept": total}
    elif task == "echo":
        result = args["value"]
    else:
        raise ValueError(f"unknown task {task!r}")
    if job is not None:
        job.finished_at, job.result = now(), result
        db.session.commit()
    return result


@shared_task
def cleanup() -> int:
    """Forget finished jobs older than a day."""
    old = Job.query.filter(Job.finished_at < db.func.now() - db.text("interval '1 day'"))
    count = old.delete(synchronize_session=False)
    db.session.commit()
    return count
