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
import os  # noqa: E402

from celery import signals  # noqa: E402

import stopright  # noqa: E402
from core import broker, db, forks, logs, outages  # noqa: E402
from core.celery_app import celery_app  # noqa: E402
from core.config import get_settings  # noqa: E402
from jobs import ledger  # noqa: E402
from stopright import requeue  # noqa: E402
from stopright.worker_stop import ON_HAND_BACK_SECONDS  # noqa: E402
from tasks import jobs  # noqa: E402, F401  (registers the job task)

log = logging.getLogger("jobs")


def _hand_back_ledger_row(request) -> None:
    """MainProcess: the job of a killed pool child goes back to ``queued`` (best effort, bounded).

    Its message is requeued by Celery (``task_reject_on_worker_lost``); the
    ledger row would otherwise stay ``running`` until the sweeper finds its
    lease lapsed. stopright gives this call ON_HAND_BACK_SECONDS; the
    database gets less, so a frozen one fails it in time (core/db.py).
    """
    job_id = request.args[0] if request.args else None
    if request.name != jobs.TASK_NAME or job_id is None:
        return
    try:
        with db.deadline(ON_HAND_BACK_SECONDS * 0.8):
            job = ledger.get(job_id)
            if job is not None and ledger.hand_back(job_id, job["attempts"]):
                log.warning("job %s handed back to the queue for its killed pool child", job_id)
    except Exception as exc:  # noqa: BLE001 - the sweeper requeues it after its lease
        if outages.database_outage(exc) is None:
            log.exception("could not hand back job %s; the sweeper will requeue it", job_id)
            return
        log.warning("could not hand back job %s (database %s: %s); the sweeper takes it back once its "
                    "lease lapses", job_id, outages.database_outage(exc), type(exc).__name__)


# A requeue the broker refused at a stop is spooled with the set's other state, and done once it is back.
os.environ.setdefault(requeue.SPOOL_ENV, str(get_settings().data_dir))
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
