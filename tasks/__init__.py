"""Celery side of the set: ``celery --app tasks worker`` / ``beat``."""

from tasks import jobs, lifecycle  # noqa: F401  (register tasks and signal handlers)
from tasks.celery_app import celery_app

app = celery_app

__all__ = ["app", "celery_app"]
