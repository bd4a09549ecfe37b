"""Beat's app module: ``celery --app tasks.beat_app beat`` (the scheduler: tasks/beat.py)."""

from app import shutdown

shutdown.exit_on_stop_signals()  # first: until beat's own handlers, a stop exits at once

from core.celery_app import celery_app  # noqa: E402

# Imported now, not by name when beat starts: Celery puts the current directory
# on sys.path only while it loads this module, and the scheduler imports jobs/.
from tasks import beat  # noqa: E402, F401

app = celery_app

__all__ = ["app"]
