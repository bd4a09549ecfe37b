"""The shapes users write (issue 14, point 4), as units: the registry across fork, install, checks.

The programs themselves: tests/e2e/test_user_shapes.py and tests/e2e/test_flask_app.py.
"""

from __future__ import annotations

import os
import uuid

import pytest
from celery import Celery, Task

import stopright
from stopright import checks
from stopright import registry as shutdown_registry


def forked(report) -> str:
    """``report()`` run in a forked child of this process; what it returned."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, never return into pytest
        status = 1
        try:
            os.close(read_fd)
            os.write(write_fd, str(report()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            return pipe.read().decode()
    finally:
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_inherits_only_the_handlers_registered_with_forks_true() -> None:
    parent = shutdown_registry.current()
    parent.register("own pool", lambda: None, forks=True)
    parent.register("parent's amqp", lambda: None, forks=False)
    parent.register("app database", lambda: None)

    def child() -> str:
        mine = shutdown_registry.current()
        mine.register("child's amqp", lambda: None)
        return f"{mine is not parent} {mine.names()}"

    assert forked(child) == "True ['own pool', \"child's amqp\"]"
    assert parent.names() == ["own pool", "parent's amqp", "app database"]
    assert parent.left_behind() == ["app database"]  # neither inherited nor declared per-process


def test_warn_left_behind_names_only_undeclared_handlers(caplog) -> None:
    registry = shutdown_registry.current()
    registry.register("own pool", lambda: None, forks=True)
    registry.register("probe", lambda: None, forks=False)
    shutdown_registry.warn_left_behind("a forking test")
    assert "do not inherit" not in caplog.text
    registry.register("app database", lambda: None)
    shutdown_registry.warn_left_behind("a forking test")
    assert "a forking test: the children it forks do not inherit app database (" in caplog.text
    assert "own pool" not in caplog.text and "probe" not in caplog.text


def new_app() -> Celery:
    return Celery(f"shapes-{uuid.uuid4().hex[:6]}", set_as_current=False)


def test_tasks_whose_base_is_not_handbacktask_are_named() -> None:
    app = Celery(f"shapes-{uuid.uuid4().hex[:6]}", set_as_current=False, task_cls=stopright.HandBackTask)

    @app.task(base=Task)
    def legacy() -> None: ...

    @app.task
    def fine() -> None: ...

    assert checks.tasks_not_handed_back(app) == [legacy.name]
