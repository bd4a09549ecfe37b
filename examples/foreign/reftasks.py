"""The stock Celery app: broker and result backend on Redis, default settings otherwise.

Early acknowledgement, prefetch 4 per process, pool children that die on
SIGTERM, an unbounded warm shutdown: Celery's defaults, as the first-steps
guide leaves them.
"""

import os
import time

from celery import Celery

import stopright

REDIS = os.environ.get("REDIS_URL") or f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}/0"

celery = Celery("reftasks", broker=REDIS, backend=REDIS, task_cls=stopright.HandBackTask)
stopright.install(celery)
celery.conf.beat_schedule = {
    "cleanup": {"task": "reftasks.cleanup", "schedule": 15.0},
}


@celery.task
def run_job(task, args):
    if task == "sleep":
        time.sleep(float(args["seconds"]))
        return {"slept": args["seconds"]}
    if task == "echo":
        return args["value"]
    raise ValueError(f"unknown task {task!r}")


@celery.task
def cleanup():
    return "nothing to clean"
