"""The worker's app module: ``celery --app tasks.worker worker``."""

from app import shutdown

shutdown.exit_on_stop_signals()  # first: the imports below take seconds

from core.celery_app import celery_app  # noqa: E402
from tasks import jobs, lifecycle  # noqa: E402, F401  (register the tasks and the signal handlers)

app = celery_app

__all__ = ["app"]
