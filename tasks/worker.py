"""The worker program: ``celery --app tasks.worker worker``. What happens on SIGTERM here: stopright.

``stopright.install`` gives the worker its stop (quiet, stop within the
grace, hand back: stopright/worker_stop.py). The rest is this app's own
start-up: its schema, its database connections across the pool's forks,
the embedded broker it waits for, and the ledger row of a job whose pool
child had to be killed.
"""

from stopright.signals import exit_on_stop_signals

exit_on_stop_signals()  # first: the imports below take seconds

import logging  # noqa: E402

from celery import signals  # noqa: E402

import stopright  # noqa: E402
from core import broker, db, forks, logs  # noqa: E402
from core.celery_app import celery_app  # noqa: E402
from core.config import get_settings  # noqa: E402
from jobs import ledger  # noqa: E402
from tasks import jobs  # noqa: E402, F401  (registers the job task)

log = logging.getLogger("shutdown")


def _hand_back_ledger_row(request) -> None:
    """MainProcess: the job of a pool child about to be killed goes back to ``queued`` (best effort).

    Its message is requeued by Celery (``task_reject_on_worker_lost``); the
    ledger row would otherwise stay ``running`` until the sweeper finds its
    lease lapsed.
    """
    job_id = request.args[0] if request.args else None
    if request.name != jobs.TASK_NAME or job_id is None:
        return
    try:
        job = ledger.get(job_id)
        if job is not None and ledger.hand_back(job_id, job["attempts"]):
            log.warning("job %s handed back to the queue for its killed pool child", job_id)
    except Exception:  # noqa: BLE001 - the sweeper requeues it after its lease
        log.exception("could not hand back job %s; the sweeper will requeue it", job_id)


stopright.install(celery_app, grace=get_settings().shutdown_grace_seconds, on_hand_back=_hand_back_ledger_row)


@signals.celeryd_init.connect
def _wait_for_broker(**_: object) -> None:
    """MainProcess: the embedded broker starts beside us; waiting here skips Celery's 2 s retry sleeps."""
    broker.wait_until_up()


@signals.worker_init.connect
def _before_forks(**_: object) -> None:
    """MainProcess, before the pool forks: the schema, and pages shared with the children."""
    ledger.ensure_schema()
    forks.share_with_forks()


@signals.worker_process_init.connect
def _child_init(**_: object) -> None:
    """Pool child, right after fork: its role in the logs, its own database connections."""
    logs.set_role("worker.child")
    db.after_fork()


app = celery_app

__all__ = ["app"]
