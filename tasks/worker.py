"""The worker's app module: ``celery --app tasks.worker worker``."""

from tasks import jobs, lifecycle  # noqa: F401  (register the tasks and the signal handlers)
from tasks.celery_app import celery_app

app = celery_app

__all__ = ["app"]
