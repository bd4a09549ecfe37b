"""The cheap shape checks of the Celery side's parts (stopright/upstream/support.py), run at start.

Static only (source digests, signatures, attributes, call sites in the
source): no app, pool or connection is built. The repository's shape tests
run these too, and the checks of behaviour that need real objects.
"""

from __future__ import annotations

import atexit
import ctypes
import weakref

import billiard.compat
import billiard.pool
from celery import concurrency
from celery.apps import worker as apps_worker
from celery.concurrency import asynpool, prefork, thread
from celery.worker import control, loops, pidbox, request, state
from celery.worker.consumer import Consumer as CeleryConsumer

from stopright.upstream import billiard as B
from stopright.upstream import celery as C
from stopright.upstream import celery_consumer as CC
from stopright.upstream import celery_pools as CP
from stopright.upstream import shapes

COPY_IN = "stopright/upstream/celery.py"
#: The copied methods: reach -> (upstream class, our class, method name).
COPIES = {
    "celery.concurrency.asynpool.ResultHandler.on_stop_not_started":
        (asynpool.ResultHandler, C.ResultHandler, "on_stop_not_started"),
    "celery.concurrency.asynpool.ResultHandler._flush_outqueue":
        (asynpool.ResultHandler, C.ResultHandler, "_flush_outqueue"),
    "celery.concurrency.prefork.TaskPool.on_stop": (prefork.TaskPool, C.TaskPool, "on_stop"),
}


def copies() -> None:
    """Each method copied from Celery and billiard is the version the copy follows."""
    for key, (upstream_cls, ours, name) in COPIES.items():
        shapes.check_digest(key, getattr(upstream_cls, name), C.DIGESTS[key], COPY_IN)
        shapes.check_override(key, ours, name)
    key = "billiard.pool.Worker._do_exit"
    shapes.check_digest(key, billiard.pool.Worker._do_exit, B.DO_EXIT_DIGEST,
                        "stopright/upstream/billiard.py")
    shapes.check_override(key, C.Worker, "_do_exit")
    key = "billiard.pool.Worker.after_fork: the initializer, then reset_signals (keeps SIG_IGN)"
    shapes.check_override(key, C.Worker, "after_fork")


def worker_stop() -> None:
    """The bounded stop and the pools: the copies, what they call, the worker state the stop reads."""
    copies()
    shapes.check_signature("celery.concurrency.prefork._run_ready_callbacks", prefork._run_ready_callbacks,
                           "hub")
    shapes.check_attributes("celery.concurrency.asynpool.AsynPool.ResultHandler / .Worker", asynpool.AsynPool,
                            ["ResultHandler", "Worker"])
    shapes.check_attributes("celery.concurrency.prefork.TaskPool.Pool", prefork.TaskPool, ["Pool"])
    key = "billiard.pool CLOSE / RUN / TERMINATE / WorkersJoined, billiard.compat.setblocking"
    shapes.check_attributes(key, billiard.pool, ["CLOSE", "RUN", "TERMINATE", "WorkersJoined"])
    shapes.check_signature(key, billiard.compat.setblocking, "handle, blocking")
    shapes.check_signature("celery.concurrency.asynpool.iterate_file_descriptors_safely",
                           asynpool.iterate_file_descriptors_safely,
                           "fds_iter, source_data, hub_method, args, kwargs")
    shapes.check_attributes("billiard.pool.Pool.Worker", billiard.pool.Pool, ["Worker"])
    shapes.check_attributes("billiard.pool.DEATH, EX_OK, EX_FAILURE, TERM_SIGNAL", billiard.pool,
                            ["DEATH", "EX_OK", "EX_FAILURE", "TERM_SIGNAL"])
    stop_handlers(C.STOP_HANDLERS)
    shapes.check_attributes("celery.worker.state.should_stop", state, ["should_stop", "maybe_shutdown"])
    shapes.check_attributes("celery.worker.state.active_requests", state, ["active_requests"])
    shapes.check_attributes("celery.worker.request.Request.worker_pid", request.Request, ["worker_pid"])
    shapes.check_text("celery.worker.request.Request.worker_pid", request.Request.on_accepted,
                      ["self.worker_pid = pid"], "the child's pid is set when it accepts the request")
    shapes.check_attributes("celery.concurrency.ALIASES / get_implementation", concurrency,
                            ["ALIASES", "get_implementation"])
    key = "celery.concurrency.thread.TaskPool.executor / on_apply's ApplyResult.f / on_stop"
    shapes.check_override(key, CP.ThreadTaskPool, "on_stop")
    shapes.check_override(key, CP.ThreadTaskPool, "on_apply")
    shapes.check_calls(key, thread.TaskPool.on_stop, ["self.executor.shutdown("], "the threads pool's stop")
    shapes.check_attributes("atexit._run_exitfuncs", atexit, ["_run_exitfuncs"])
    shapes.check_attributes("ctypes.pythonapi.PyThreadState_SetAsyncExc", ctypes.pythonapi,
                            ["PyThreadState_SetAsyncExc"], what="ctypes.pythonapi")
    shapes.check_attributes("weakref.WeakSet.data", weakref.WeakSet(), ["data"], what="weakref.WeakSet")


def stop_handlers(key: str) -> None:
    """Celery installs its stop handlers in ``on_start``, through the instance's platform tweaks."""
    shapes.check_attributes(key, apps_worker.Worker, ["install_platform_tweaks", "on_start"])
    shapes.check_text(key, apps_worker.Worker.on_start, ["self.install_platform_tweaks(self)"],
                      "Celery installs its stop handlers there; stopright's replace them right after")


def remote_shutdown() -> None:
    """``celery control shutdown``: the mailbox dispatches by name through ``Panel.data``."""
    key = "celery.worker.control: the 'shutdown' command"
    shapes.check_attributes(key, control.Panel, ["data", "meta"])
    shapes.check_text(key, pidbox.Pidbox.__init__, ["handlers=control.Panel.data"],
                      "the worker's mailbox dispatches through Panel.data, by name")


def consumer() -> None:
    """stopright's consumer: the hooks it overrides and the call sites it relies on."""
    key = "celery.worker.consumer.Consumer.on_ready / ensure_connected / hub.readers"
    shapes.check_override(key, CC.Consumer, "on_ready")
    shapes.check_override(key, CC.Consumer, "ensure_connected")
    shapes.check_calls(key, loops.asynloop, ["obj.on_ready()"], "on_ready at every start of the loop")
    shapes.check_calls(key, CeleryConsumer.ensure_connected, ["conn.ensure_connection("],
                       "the retries go through conn.ensure_connection, which we give our intervals")
    key = "celery.worker.consumer.Consumer.on_connection_error_after_connected: before the reconnection"
    shapes.check_override(key, CC.Consumer, "on_connection_error_after_connected")
    shapes.check_text(key, CeleryConsumer.on_connection_error_after_connected,
                      ["self.connection.collect(", "request.task.acks_late", "request.acknowledged"],
                      "it closes the lost connection (restoring Redis's unacked messages), then cancels")
    key = "celery.worker.loops.synloop: drain_events(timeout=2.0) between should_stop checks; loop_args"
    shapes.check_override(key, CC.Consumer, "loop_args")
    shapes.check_text(key, loops.synloop, ["connection.drain_events(timeout=2.0)", "state.maybe_shutdown()"],
                      "gevent's and eventlet's loop waits for the broker between two checks of a stop")


def beat() -> None:
    """Beat: the sync handler replaced, and the loop that ends on SystemExit and closes the scheduler."""
    from celery import beat as celery_beat  # noqa: PLC0415 - beat's modules, in beat only
    from celery.apps import beat as apps_beat  # noqa: PLC0415

    key = "celery.apps.beat.Beat.install_sync_handler / Celery.Beat (a cached property)"
    shapes.check_signature(key, apps_beat.Beat.install_sync_handler, "self, service")
    shapes.check_calls(key, apps_beat.Beat.start_scheduler, ["self.install_sync_handler(service)"],
                       "beat installs its sync handler through this method, which ours replaces")
    key = "celery.beat.Service.start / sync"
    shapes.check_text(key, celery_beat.Service.start, ["except (KeyboardInterrupt, SystemExit):", "finally:",
                                                       "self.sync()"],
                      "beat's loop ends on our handler's SystemExit and syncs on its way out")
    shapes.check_calls(key, celery_beat.Service.sync, ["self.scheduler.close()"],
                       "the sync closes the scheduler: StopRightBeat.close runs the registry")
