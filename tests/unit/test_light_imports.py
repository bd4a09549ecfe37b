"""What stopright's processes carry at rest: no Celery in a gunicorn master whose app is not preloaded,
no psutil in the broker's watcher until the stop, none of the worker's side in a process that publishes.

Each module loaded is memory every process of the set pays for at rest (the gunicorn master's
is copied into each worker as the worker touches it); scripts/bench's foreign app measures it.
"""

from __future__ import annotations

import subprocess
import sys

from tests.procset import ROOT


def loaded_after(code: str, *names: str) -> dict[str, bool]:
    """Which of ``names`` are in sys.modules after ``code``, run in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(str(n in sys.modules) for n in {names!r}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    return dict(zip(names, (word == "True" for word in out), strict=True))


def test_the_gunicorn_hooks_load_no_celery_into_a_master_that_does_not_preload_the_app() -> None:
    # gunicorn's config loader imports the module given as --config python:stopright.gunicorn_hooks
    code = "import gunicorn.app.wsgiapp, gunicorn.arbiter\nimport stopright.gunicorn_hooks"
    assert loaded_after(code, "gunicorn", "stopright.gunicorn_hooks", "celery", "kombu") == {
        "gunicorn": True, "stopright.gunicorn_hooks": True, "celery": False, "kombu": False}


def test_the_watcher_loads_psutil_only_when_it_counts_clients() -> None:
    assert loaded_after("import stopright.outlive", "stopright.outlive", "psutil") == {
        "stopright.outlive": True, "psutil": False}


def test_install_in_a_process_that_only_publishes_loads_none_of_the_workers_side() -> None:
    # A web worker imports the app module, which calls install(): it never runs a task or a pool.
    code = ("from celery import Celery\nimport stopright\n"
            "app = Celery('app', broker='redis://127.0.0.1:1/0', task_cls=stopright.HandBackTask)\n"
            "stopright.install(app)")
    heavy = ("stopright.celery_worker", "stopright.worker_stop", "celery.worker.consumer", "billiard.pool",
             "psutil")
    assert loaded_after(code, "stopright.celery_app", *heavy) == {
        "stopright.celery_app": True, **dict.fromkeys(heavy, False)}
