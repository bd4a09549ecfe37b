"""HandBackTask in the shapes users write (issue 14, point 4): the hand-back signal, in this process.

Each test runs a real Celery task the way a pool child does (``apply``: Celery's
tracer, which calls a task class's own ``__call__``) and sends itself the
worker's hand-back signal (SIGUSR2) while the task runs, as the worker's
MainProcess does at the end of the grace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, Task, shared_task
from celery.exceptions import Reject

from stopright import handback
from stopright.handback import HandBackTask


@pytest.fixture(autouse=True)
def hand_back_signal() -> Iterator[None]:
    previous = signal.signal(handback.HANDBACK_SIGNAL, handback.interrupt)
    try:
        yield
    finally:
        signal.signal(handback.HANDBACK_SIGNAL, previous)


def hand_back_now() -> None:
    """What the worker's MainProcess sends a busy pool child once the grace is used up."""
    os.kill(os.getpid(), handback.HANDBACK_SIGNAL)
    time.sleep(5)  # the signal interrupts this
    raise AssertionError("the task was not interrupted")


def flask_style_app(entered: list[str], backend: str = "cache+memory://") -> Celery:
    """The Flask docs' celery_init_app, README base: ``__call__`` runs ``self.run`` in a context."""

    @contextlib.contextmanager
    def app_context() -> Iterator[None]:
        entered.append("enter")
        try:
            yield
        finally:
            entered.append("exit")

    class FlaskTask(HandBackTask):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app_context():
                return self.run(*args, **kwargs)

    return Celery(f"flask-{uuid.uuid4().hex[:6]}", broker="memory://", backend=backend,
                  task_cls=FlaskTask, set_as_current=False)


def rejected(task: Task, *args: Any, **kwargs: Any) -> Reject:
    """Run ``task`` as a pool child would; the Reject it ended with (Celery's tracer keeps it)."""
    result = task.apply(args, kwargs, task_id=str(uuid.uuid4()), throw=False)
    assert result.state == "REJECTED", (result.state, result.result)
    assert isinstance(result.result, Reject), result.result
    return result.result


def test_a_flask_task_whose_call_runs_self_run_is_handed_back() -> None:
    entered: list[str] = []
    app = flask_style_app(entered)

    @app.task
    def long_job() -> None:
        hand_back_now()

    reject = rejected(long_job)
    assert reject.requeue is True and reject.reason == handback.HANDED_BACK
    assert entered == ["enter", "exit"]  # the app context was left on the way out
    assert handback._run.active is False


def test_shared_task_with_bind_on_the_flask_base_is_handed_back() -> None:
    entered: list[str] = []
    app = flask_style_app(entered)
    seen: list[object] = []

    @shared_task(bind=True, name=f"bound-{uuid.uuid4().hex[:6]}")
    def bound_job(self: Task) -> None:
        seen.append(self)
        hand_back_now()

    task = app.tasks[bound_job.name]  # shared_task builds it on the app, on the app's task_cls
    assert rejected(task).requeue is True
    assert seen == [task] and entered == ["enter", "exit"]


def test_a_call_that_calls_super_and_a_task_calling_another_hand_back_once() -> None:
    app = Celery(f"nested-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    calls: list[str] = []

    class Outer(HandBackTask):
        def __call__(self, *args: object, **kwargs: object) -> object:
            calls.append("outer")
            return super().__call__(*args, **kwargs)

    @app.task(base=Outer)
    def inner() -> str:
        return "inner"

    @app.task(base=Outer)
    def job() -> None:
        assert inner() == "inner"  # a task called directly, inside this run
        hand_back_now()  # this run is still the one handed back

    assert rejected(job).requeue is True
    assert calls == ["outer", "outer"]
    assert handback._run.active is False


def _stored_state(app: Celery, task_id: str) -> str:
    return app.backend.get_task_meta(task_id)["status"]


def test_a_handed_back_run_shows_pending_not_its_progress() -> None:
    app = flask_style_app([])
    states: list[str] = []

    @app.task(bind=True)
    def progress(self: Task) -> None:
        self.update_state(state="PROGRESS", meta={"current": 1, "total": 10})
        states.append(_stored_state(app, self.request.id))
        hand_back_now()

    task_id = str(uuid.uuid4())
    result = progress.apply(task_id=task_id, throw=False)
    assert result.state == "REJECTED", result.result
    assert states == ["PROGRESS"]
    assert _stored_state(app, task_id) == "PENDING"


def test_a_task_that_stored_nothing_writes_nothing_at_its_hand_back() -> None:
    app = flask_style_app([])
    stores: list[tuple[Any, ...]] = []
    store_result = app.backend.store_result

    def counting(*args: Any, **kwargs: Any) -> Any:
        stores.append(args)
        return store_result(*args, **kwargs)

    app.backend.store_result = counting  # type: ignore[method-assign]

    @app.task
    def quiet() -> None:
        hand_back_now()

    assert rejected(quiet).requeue is True
    assert stores == []


@contextlib.contextmanager
def silent_redis() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers (a frozen backend)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    finally:
        server.close()


def test_a_backend_that_does_not_answer_cannot_hold_the_hand_back(caplog) -> None:
    with silent_redis() as url:
        app = flask_style_app([], backend=url)

        @app.task(track_started=True)  # as if Celery had stored STARTED (the silent backend never would)
        def frozen_backend_job() -> None:
            hand_back_now()

        reject = rejected(frozen_backend_job)  # a hang here would be the backend holding the hand-back
    assert reject.requeue is True
    assert "its stored state could not be reset to PENDING (no answer within" in caplog.text, caplog.text
