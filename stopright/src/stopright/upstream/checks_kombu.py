"""The cheap shape checks of the kombu parts (stopright/upstream/support.py), run at start.

Static only: no pool, connection or message is built (the repository's shape
tests do that too).
"""

from __future__ import annotations

import inspect

from celery import Celery, _state
from celery.worker import request
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import pools as kombu_pools
from kombu.connection import Connection
from kombu.resource import Resource

from stopright.upstream import shapes


def pools() -> None:
    """The close of pooled connections: kombu's pools, their private sets, the close with a handshake."""
    for name, reach in (("_dirty", "kombu.resource.Resource._dirty"),
                        ("_resource", "kombu.resource.Resource._resource"),
                        ("_closed", "kombu.resource.Resource._closed")):
        shapes.check_text(reach, Resource.__init__, [f"self.{name} = "], "the pool's private state")
    shapes.check_text("kombu.resource.Resource._closed", Resource.force_close_all,
                      ["if self._closed:\nreturn"],
                      "kombu's after-fork reset skips a pool marked closed (forget_inherited)")
    key = "kombu.Connection._close"
    shapes.check_signature(key, Connection._close, "self")
    shapes.check_calls(key, Connection.release, ["self._close()"], "release() outside a pool is _close()")
    shapes.check_attributes("kombu.pools.connections / kombu.pools.producers", kombu_pools,
                            ["connections", "producers"])
    key = "celery._state._get_active_apps / _tls.current_app / Celery._after_fork"
    shapes.check_attributes(key, _state, ["_get_active_apps", "_tls"])
    shapes.check_text(key, _state._get_active_apps, ["return _apps"], "every app, for the after-fork reset")
    shapes.check_signature(key, Celery._after_fork, "self")


def requeue() -> None:
    """A refused requeue, done later: Celery's reject reports it through kombu; Redis restores by tag."""
    from kombu.transport import redis as kombu_redis  # noqa: PLC0415 - needs redis-py, as the transport

    reject_reporter("celery Request.reject -> kombu.Message.reject_log_error")
    key = "kombu.transport.redis.QoS.restore_by_tag"
    shapes.check_signature(key, kombu_redis.QoS.restore_by_tag, "self, tag, client, leftmost")
    shapes.check_text(key, kombu_redis.QoS.reject, ["self.restore_by_tag(delivery_tag, leftmost=True)"],
                      "a reject with requeue restores leftmost: stopright's restore does the same")


def reject_reporter(key: str) -> None:
    """Celery's reject hands kombu a reporter (``Request.on_reject``); the task's callback is kombu's."""
    shapes.check_text(key, request.Request.reject,
                      ["self._on_reject(logger, self._connection_errors, requeue)"],
                      "stopright's Request sets on_reject to hand kombu its reporter instead of the logger")
    on_reject = inspect.getattr_static(request.Request, "on_reject")
    if not isinstance(on_reject, property) or on_reject.fset is None:
        shapes.fail(key, "celery changed Request.on_reject: no longer a settable property",
                    "re-read stopright/requeue.py Request.reject")
    shapes.check_text(key, CeleryConsumer.create_task_handler,
                      ["promise(call_soon_ack, (message.reject_log_error,)"],
                      "the task's reject callback is kombu's reject_log_error, given the reject's logger")
