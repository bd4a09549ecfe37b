"""Upgrade-shape tests: every reach of stopright/upstream/ into Celery, billiard and CPython.

One check per key of each module's ``REACHES`` (gunicorn's: test_upstream_shapes_gunicorn.py,
kombu's: test_upstream_shapes_kombu.py),
against the installed library, with real objects where they are cheap (a kombu pool on
``memory://``, a Celery app, a kombu hub): the digest of every copied method, the signature
of every hook, the call sites whose behaviour is relied on, every private attribute. A
failure names the reach and what to re-read (tests/shapes.py). A reach with no check fails
too, and the checks are shown to fail on a changed shape.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import weakref

import billiard.compat
import billiard.pool
import pytest
from celery import Celery, _state
from celery.app import trace
from celery.concurrency import asynpool, prefork
from celery.exceptions import Reject, WorkerShutdown
from celery.worker import control, loops, pidbox, request, state
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection
from kombu import pidbox as kombu_pidbox
from kombu.asynchronous import Hub

from stopright import handback
from stopright.upstream import celery as celery_internals
from stopright.upstream import celery_consumer
from tests import shapes

CHECKS = shapes.Checks()
shape = CHECKS
#: The upstream modules whose reaches this file checks; every other one is checked in:
HERE = {"stopright.upstream.celery", "stopright.upstream.celery_consumer"}
POOLS = "tests/unit/test_upstream_shapes_pools.py"
ELSEWHERE = {"stopright.upstream.gunicorn": "tests/unit/test_upstream_shapes_gunicorn.py",
             "stopright.upstream.kombu": "tests/unit/test_upstream_shapes_kombu.py",
             **{f"stopright.upstream.{name}": POOLS
                for name in ("billiard", "cpython", "celery_pools", "gevent", "eventlet")}}


# -- Celery (stopright/upstream/celery.py) ------------------------------------------------------

C = celery_internals
CC = celery_consumer
COPY_IN = "stopright/upstream/celery.py"


def _copied(key: str, upstream_cls: type, ours: type, name: str) -> None:
    shapes.check_digest(key, getattr(upstream_cls, name), C.DIGESTS[key], COPY_IN)
    shapes.check_override(key, ours, name)
    shapes.check_self_attributes(key, getattr(ours, name), upstream_cls)


@shape(C, "celery.concurrency.asynpool.ResultHandler.on_stop_not_started")
def _(key: str) -> None:
    _copied("celery.concurrency.asynpool.ResultHandler.on_stop_not_started",
            asynpool.ResultHandler, C.ResultHandler, "on_stop_not_started")


@shape(C, "celery.concurrency.asynpool.ResultHandler._flush_outqueue")
def _(key: str) -> None:
    _copied("celery.concurrency.asynpool.ResultHandler._flush_outqueue",
            asynpool.ResultHandler, C.ResultHandler, "_flush_outqueue")


@shape(C, "celery.concurrency.prefork.TaskPool.on_stop")
def _(key: str) -> None:
    _copied("celery.concurrency.prefork.TaskPool.on_stop", prefork.TaskPool, C.TaskPool, "on_stop")


@shape(C, "celery.concurrency.prefork._run_ready_callbacks")
def _(key: str) -> None:
    shapes.check_signature(key, prefork._run_ready_callbacks, "hub")
    shapes.check_calls(key, prefork.TaskPool.on_stop, ["_run_ready_callbacks(hub)"], "the on_stop copy")


@shape(C, "celery.concurrency.asynpool.AsynPool.ResultHandler / .Worker")
def _(key: str) -> None:
    shapes.check_attributes(key, asynpool.AsynPool, ["ResultHandler", "Worker"])
    shapes.check_calls(key, billiard.pool.Pool.create_result_handler, ["self.ResultHandler("],
                       "the pool builds its result handler from its class attribute")
    shapes.check_calls(key, billiard.pool.Pool._create_worker_process, ["self.Worker("],
                       "the pool builds each child from its class attribute")
    assert issubclass(C.AsynPool.ResultHandler, asynpool.AsynPool.ResultHandler), key
    assert issubclass(C.AsynPool.Worker, asynpool.AsynPool.Worker), key


@shape(C, "celery.concurrency.prefork.TaskPool.Pool")
def _(key: str) -> None:
    shapes.check_attributes(key, prefork.TaskPool, ["Pool"])
    shapes.check_text(key, prefork.TaskPool.on_start, ["else self.Pool", "Pool(processes="],
                      "on_start builds the pool of the class attribute Pool, ours")


@shape(C, "billiard.pool CLOSE / RUN / TERMINATE / WorkersJoined, billiard.compat.setblocking")
def _(key: str) -> None:
    shapes.check_attributes(key, billiard.pool, ["CLOSE", "RUN", "TERMINATE", "WorkersJoined"])
    shapes.check_signature(key, billiard.compat.setblocking, "handle, blocking")
    # The copies compare the pool's state with billiard's constants, as Celery's own code does.
    for name in ("RUN", "TERMINATE", "WorkersJoined"):
        if getattr(asynpool, name, None) is not getattr(billiard.pool, name):
            shapes.fail(key, f"celery.concurrency.asynpool.{name} is no longer billiard.pool.{name}",
                        f"re-read the copies in {COPY_IN}")


@shape(C, "celery.concurrency.asynpool.iterate_file_descriptors_safely")
def _(key: str) -> None:
    shapes.check_signature(key, asynpool.iterate_file_descriptors_safely,
                           "fds_iter, source_data, hub_method, args, kwargs")


@shape(C, "celery.beat.Service.start / sync")
def _(key: str) -> None:
    from celery import beat

    shapes.check_text(key, beat.Service.start, ["except (KeyboardInterrupt, SystemExit):", "finally:",
                                                "self.sync()"],
                      "beat's loop ends on our handler's SystemExit and syncs on its way out")
    shapes.check_calls(key, beat.Service.sync, ["self.scheduler.close()"],
                       "the sync closes the scheduler: StopRightBeat.close runs the registry")


@shape(C, "celery.apps.beat.Beat.install_sync_handler / Celery.Beat (a cached property)")
def _(key: str) -> None:
    from celery.apps import beat as apps_beat

    shapes.check_signature(key, apps_beat.Beat.install_sync_handler, "self, service")
    shapes.check_calls(key, apps_beat.Beat.start_scheduler, ["self.install_sync_handler(service)"],
                       "beat installs its sync handler through this method, which ours replaces")
    app = Celery("shape-check", set_as_current=False)
    C.beat_without_sync_handler(app)
    assert app.Beat.install_sync_handler(object.__new__(app.Beat), None) is None, key
    assert issubclass(app.Beat, apps_beat.Beat), f"{key}: Celery.Beat is no longer a Beat subclass"


@shape(C, "celery.worker.state.should_stop")
def _(key: str) -> None:
    shapes.check_attributes(key, state, ["should_stop", "maybe_shutdown"])
    shapes.check_calls(key, loops.asynloop, ["state.maybe_shutdown()"], "the event loop checks the flag")
    saved = state.should_stop
    try:
        C.warm_shutdown()
        with pytest.raises(WorkerShutdown) as raised:
            state.maybe_shutdown()
        assert raised.value.code == 0, f"{key}: warm_shutdown's 0 is not an exit code 0 any more"
    finally:
        state.should_stop = saved


@shape(C, "celery.worker.state.active_requests")
def _(key: str) -> None:
    shapes.check_attributes(key, state, ["active_requests"])
    assert isinstance(state.active_requests, weakref.WeakSet), (key, type(state.active_requests))
    shapes.check_calls(key, state.task_accepted, ["add_active_request(request)"],
                       "a request a pool child accepted is in active_requests")


@shape(C, "celery.worker.request.Request.worker_pid")
def _(key: str) -> None:
    shapes.check_attributes(key, request.Request, ["worker_pid"])
    shapes.check_text(key, request.Request.on_accepted, ["self.worker_pid = pid", "task_accepted(self)"],
                      "the child's pid is set when it accepts the request")


@shape(C, C.STOP_HANDLERS)
def _(key: str) -> None:
    from stopright.upstream.checks_celery import stop_handlers

    stop_handlers(key)

    class Worker:
        def install_platform_tweaks(self, worker: object) -> None:
            order.append("celery's")

    order: list[str] = []
    worker = Worker()
    C.after_stop_handlers(worker, lambda w: order.append("stopright's"))
    worker.install_platform_tweaks(worker)
    assert order == ["celery's", "stopright's"], order


@shape(C, "celery.worker.control: the 'shutdown' command")
def _(key: str) -> None:
    shapes.check_attributes(key, control.Panel, ["data", "meta"])
    shapes.check_text(key, pidbox.Pidbox.__init__, ["handlers=control.Panel.data"],
                      "the worker's mailbox dispatches through Panel.data, by name")
    shapes.check_text(key, kombu_pidbox.Node.handle, ["self.handlers[method](self.state, **arguments)"],
                      "a command is called with the state first, then its arguments")
    saved = control.Panel.data["shutdown"], control.Panel.meta["shutdown"]
    called = []
    try:
        C.replace_shutdown_command(lambda: called.append(True))
        with pytest.raises(WorkerShutdown):
            control.Panel.data["shutdown"](object())
    finally:
        control.Panel.data["shutdown"], control.Panel.meta["shutdown"] = saved
    assert called, f"{key}: the replaced command is not what Panel.data['shutdown'] runs"


@shape(CC, "celery.worker.consumer.Consumer.on_ready / ensure_connected / hub.readers")
def _(key: str) -> None:
    shapes.check_override(key, CC.Consumer, "on_ready")
    shapes.check_override(key, CC.Consumer, "ensure_connected")
    shapes.check_calls(key, loops.asynloop, ["obj.on_ready()"], "on_ready at every start of the loop")
    shapes.check_calls(key, CeleryConsumer.ensure_connected, ["conn.ensure_connection("],
                       "the retries go through conn.ensure_connection, which we give our intervals")
    shapes.check_no_call(key, CeleryConsumer.ensure_connected, "interval_",
                         "Celery passes no interval of its own, which would override ours")
    hub = Hub()
    try:
        shapes.check_attributes(key, hub, ["readers", "add_reader"])
        shapes.check_signature(key, hub.add_reader, "fds, callback, args")
        read_fd, write_fd = os.pipe()
        try:
            hub.add_reader(read_fd, lambda: None)
            assert read_fd in hub.readers, f"{key}: Hub.readers is not keyed by fd any more"
            hub.remove(read_fd)
        finally:
            os.close(read_fd)
            os.close(write_fd)
    finally:
        hub.close()


@shape(CC, "celery.worker.consumer.Consumer.on_connection_error_after_connected: before the reconnection")
def _(key: str) -> None:
    shapes.check_override(key, CC.Consumer, "on_connection_error_after_connected")
    shapes.check_text(key, CeleryConsumer.on_connection_error_after_connected,
                      ["self.connection.collect(", "if self.app.conf.worker_cancel_long_running_tasks_on_"
                       "connection_loss:", "request.task.acks_late", "request.acknowledged"],
                      "it closes the lost connection (restoring Redis's unacked messages), then cancels")
    shapes.check_text(key, request.Request.reject, ["if not self.acknowledged:"],
                      "forget_delivery: a request marked acknowledged is not rejected on the dead channel")
    shapes.check_text(key, request.Request.acknowledge, ["if not self.acknowledged:"],
                      "forget_delivery: nor acknowledged")


@shape(CC, "celery.worker.loops.synloop: drain_events(timeout=2.0) between should_stop checks; loop_args")
def _(key: str) -> None:
    shapes.check_text(key, loops.synloop, ["connection.drain_events(timeout=2.0)", "state.maybe_shutdown()"],
                      "gevent's and eventlet's loop waits for the broker between two checks of a stop")
    shapes.check_override(key, CC.Consumer, "loop_args")
    shapes.check_text(key, CeleryConsumer.__init__, ["loops.asynloop if hub else loops.synloop"],
                      "synloop runs where the consumer has no hub")
    with Connection("memory://") as conn:
        CC.notice_stops_soon(conn)
        CC.notice_stops_soon(conn)  # at each start of the loop: capped once
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=30)
        assert time.monotonic() - started < 10, f"{key}: the cap did not shorten the wait"


@shape(C, "celery._state._get_active_apps / _tls.current_app / Celery._after_fork")
def _(key: str) -> None:
    shapes.check_attributes(key, _state, ["_get_active_apps", "_tls"])
    shapes.check_attributes(key, _state._tls, ["current_app"], what="celery._state._tls")
    app = Celery("shapes", broker="memory://", set_as_current=False)
    try:
        assert app in _state._get_active_apps(), f"{key}: a new app is not among the active apps"
        shapes.check_signature(key, app._after_fork, "")
        app.pool  # noqa: B018  (builds the app's connection pool)
        app._after_fork()
        assert app._pool is None, f"{key}: Celery._after_fork no longer forgets the app's pool"
    finally:
        app.close()


@shape(C, "celery.app.trace.build_tracer: a task class's own __call__ is called (task_has_custom)")
def _(key: str) -> None:
    shapes.check_text(key, trace.build_tracer,
                      ["fun = task if task_has_custom(task, '__call__') else task.run"],
                      "HandBackTask.__call__ runs around each task (else Celery calls run() directly)")
    app = Celery("shapes", broker="memory://", set_as_current=False, task_cls=handback.HandBackTask)
    try:
        @app.task
        def inside() -> bool:
            return handback._run.active  # set only by HandBackTask.__call__

        assert inside.apply().get() is True, f"{key}: Celery ran the task without HandBackTask.__call__"
    finally:
        app.close()


@shape(C, "celery.backends.database.DatabaseBackend.session_manager.invalidate(url)")
def _(key: str) -> None:
    backend = Celery("shapes", broker="memory://", backend="db+sqlite://", set_as_current=False).backend
    backend.session_manager._after_fork()  # as in a pool child: an engine kept per URL
    backend.ResultSession().close()
    assert backend.session_manager._engines, f"{key}: a forked pool child keeps no engine now: re-read"
    C.result_backend_close(backend)()  # type: ignore[misc]
    assert not backend.session_manager._engines, f"{key}: invalidate(url) no longer drops the engine"


@shape(C, "celery.app.trace logger: a task's Reject is logged there, with its traceback")
def _(key: str) -> None:
    records: list[logging.LogRecord] = []
    catch = logging.Handler()
    catch.emit = records.append  # type: ignore[method-assign]
    logging.getLogger(C.TRACE_LOGGER).addHandler(catch)
    app = Celery("shapes", broker="memory://", set_as_current=False)
    try:
        @app.task
        def rejected() -> None:
            raise Reject("a shape check", requeue=True)  # not a hand-back: QuietHandBack keeps it

        rejected.apply()
    finally:
        logging.getLogger(C.TRACE_LOGGER).removeHandler(catch)
        app.close()
    if not any(r.exc_info and isinstance(r.exc_info[1], Reject) for r in records):
        shapes.fail(key, f"Celery no longer logs a Reject with its traceback on {C.TRACE_LOGGER!r}",
                    "find where celery/app/trace.py logs it now; point TRACE_LOGGER there")


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "key"), CHECKS.cases(), ids=[key for _, key in CHECKS.cases()])
def test_upstream_shape(module: str, key: str) -> None:
    CHECKS.run(module, key)


def test_every_reach_has_a_shape_check() -> None:
    """A new reach cannot land without its check, nor a new upstream module without a file checking it."""
    problems = CHECKS.problems(HERE)
    problems += [f"{name}: no test file checks its reaches (add it to HERE or ELSEWHERE)"
                 for name in shapes.upstream_modules() if name not in HERE and name not in ELSEWHERE]
    assert not problems, "\n".join(problems)
