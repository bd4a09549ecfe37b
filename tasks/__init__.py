"""The worker and beat programs (Celery).

``celery --app tasks.worker worker`` loads the job runner and the worker's
start/stop wiring; ``celery --app tasks.beat_app beat`` loads only the
Celery app, so beat carries no database code (it sends tasks by name).
"""
