"""Beat's app module: ``celery --app tasks.beat_app beat`` (the scheduler: tasks/beat.py)."""

from app import shutdown

shutdown.exit_on_stop_signals()  # first: until beat's own handlers, a stop exits at once

from tasks.celery_app import celery_app  # noqa: E402

app = celery_app

__all__ = ["app"]
