"""The upgrade-shape checks can fail: each kind, fed a changed upstream shape, fails naming its reach.

The registered checks of test_upstream_shapes.py, _gunicorn.py and _pools.py are run
against an upstream that pytest's ``monkeypatch`` changes for one test (a copied method with
another body, a hook with other parameters or gone, a call site moved, a private attribute
removed, a behaviour dropped, a reach added without its check); the helpers of tests/shapes.py
against functions of this file.
"""

from __future__ import annotations

import os

import billiard.pool
import pytest
from celery.concurrency import asynpool
from celery.worker import state
from celery.worker.consumer import Consumer as CeleryConsumer
from gunicorn.arbiter import Arbiter
from gunicorn.http import message
from gunicorn.workers import gthread

from stopright.upstream import billiard as billiard_internals
from stopright.upstream import celery as celery_internals
from stopright.upstream import gunicorn as gunicorn_internals
from stopright.upstream import source_digest
from tests import shapes
from tests.unit.test_upstream_shapes import CHECKS as CORE
from tests.unit.test_upstream_shapes import HERE
from tests.unit.test_upstream_shapes_gunicorn import BASE, GTHREAD, HANDLERS
from tests.unit.test_upstream_shapes_gunicorn import CHECKS as GUNICORN
from tests.unit.test_upstream_shapes_pools import CHECKS as POOLED  # billiard's, among others

CELERY = "stopright.upstream.celery"
BILLIARD = "stopright.upstream.billiard"
GUNICORN_MODULE = "stopright.upstream.gunicorn"


def _fails(checks: shapes.Checks, module: str, key: str, *expected: str) -> str:
    """Run the check of ``key``: it must raise ShapeChanged naming the reach and each of ``expected``."""
    with pytest.raises(shapes.ShapeChanged) as failed:
        checks.run(module, key)
    text = str(failed.value)
    assert f"[reach: {key!r}]" in text, text
    for part in expected:
        assert part in text, (part, text)
    return text


# -- copies --------------------------------------------------------------------------------------


def original(fd, remove):
    if fd is None:
        return remove(fd)
    return fd


def changed(fd, remove):
    if fd is None:
        return remove(fd)
    return fd + 0  # one expression changed


def test_the_digest_check_reports_a_changed_body() -> None:
    pinned = source_digest(original)
    shapes.check_digest("a.reach", original, pinned, "stopright/upstream/x.py")  # unchanged: passes
    with pytest.raises(shapes.ShapeChanged) as failed:
        shapes.check_digest("a.reach", changed, pinned, "stopright/upstream/x.py")
    assert str(failed.value).endswith(
        f" changed changed (digest {source_digest(changed)}, pinned {pinned}): "
        f"re-read it and update the copy in stopright/upstream/x.py, then the pin  [reach: 'a.reach']")


def test_a_copied_celery_method_with_another_body_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "celery.concurrency.asynpool.ResultHandler._flush_outqueue"
    # Celery "upgraded" to our own copy: a method of that name with another body.
    ours = celery_internals.ResultHandler._flush_outqueue
    monkeypatch.setattr(asynpool.ResultHandler, "_flush_outqueue", ours)
    text = _fails(CORE, CELERY, key, "changed ResultHandler._flush_outqueue (digest ",
                  f"pinned {celery_internals.DIGESTS[key]})",
                  "re-read it and update the copy in stopright/upstream/celery.py, then the pin")
    assert source_digest(ours) in text


def test_billiards_exit_with_another_body_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(billiard.pool.Worker, "_do_exit", billiard_internals.QuickExit._do_exit)
    _fails(POOLED, BILLIARD, "billiard.pool.Worker._do_exit", f"pinned {billiard_internals.DO_EXIT_DIGEST}",
           "stopright/upstream/billiard.py")


# -- hooks ---------------------------------------------------------------------------------------


def test_a_hook_with_other_parameters_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def _cap_keepalive(self, deadline, now):
        pass

    monkeypatch.setattr(gthread.ThreadWorker, "_cap_keepalive", _cap_keepalive)
    _fails(GUNICORN, GUNICORN_MODULE, GTHREAD, "ThreadWorker._cap_keepalive(self, deadline, now)",
           "overrides it as _cap_keepalive(self, deadline);")


def test_a_hook_gone_upstream_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(CeleryConsumer, "on_ready")
    _fails(CORE, "stopright.upstream.celery_consumer",
           "celery.worker.consumer.Consumer.on_ready / ensure_connected / hub.readers",
           "defines on_ready any more")


def test_a_hook_called_with_other_parameters_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Arbiter, "kill_workers", lambda self, sig, graceful: None)
    _fails(GUNICORN, GUNICORN_MODULE, "gunicorn.arbiter.Arbiter.signal / kill_workers",
           "(self, sig, graceful), we call it with (self, sig)")


# -- call sites ----------------------------------------------------------------------------------


def run_capping_first(self):
    while self.alive:
        self.notify()
    self._cap_keepalive(0)
    self.set_accept_enabled(False)


def run_capping_twice(self):
    while self.alive:
        self._cap_keepalive(0)
    self.set_accept_enabled(False)
    self._cap_keepalive(0)


def spawn_worker_exit_outside(self):
    worker = self.worker_class()
    worker.pid = os.getpid()
    try:
        worker.init_process()
        import sys
        sys.exit(0)
    except SystemExit:
        raise
    self.cfg.worker_exit(self, worker)


@pytest.mark.parametrize(("run", "expected"), [
    (run_capping_first, "no longer begins with set_accept_enabled"),
    (run_capping_twice, "_cap_keepalive is called 2 time(s)"),
])
def test_gthreads_stop_sequence_changed_fails(monkeypatch: pytest.MonkeyPatch, run, expected: str) -> None:
    monkeypatch.setattr(gthread.ThreadWorker, "run", run)
    _fails(GUNICORN, GUNICORN_MODULE, GTHREAD, expected)


def test_worker_exit_moved_out_of_the_finally_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "gunicorn.arbiter.Arbiter.spawn_worker: worker_exit in the worker's finally, after sys.exit"
    monkeypatch.setattr(Arbiter, "spawn_worker", spawn_worker_exit_outside)
    _fails(GUNICORN, GUNICORN_MODULE, key, "worker_exit is no longer called in the worker's finally",
           "stopright/gunicorn_hooks.py worker_exit")


def test_a_call_the_copy_relies_on_gone_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def __call__(self):  # billiard's Worker.__call__ without its _do_exit
        self.workloop(pid=0)

    monkeypatch.setattr(billiard.pool.Worker, "__call__", __call__)
    _fails(POOLED, BILLIARD, "billiard.pool.Worker._do_exit", "no call 'self._do_exit('")


# -- private attributes, behaviour --------------------------------------------------------------


def test_a_private_attribute_gone_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(billiard.pool, "TERM_SIGNAL")
    _fails(POOLED, BILLIARD, "billiard.pool.DEATH, EX_OK, EX_FAILURE, TERM_SIGNAL", "no TERM_SIGNAL")
    monkeypatch.delattr(state, "active_requests")
    _fails(CORE, CELERY, "celery.worker.state.active_requests", "no active_requests")


def test_an_instance_attribute_gone_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    upstream_init = gthread.ThreadWorker.__init__

    def __init__(self, *args, **kwargs):
        upstream_init(self, *args, **kwargs)
        del self.nr_conns  # renamed, say

    monkeypatch.setattr(gthread.ThreadWorker, "__init__", __init__)
    _fails(GUNICORN, GUNICORN_MODULE, GTHREAD, "no nr_conns")


def test_force_close_that_no_longer_closes_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message.Message, "force_close", lambda self: None)
    with pytest.raises(AssertionError, match="does not say Connection: close"):
        GUNICORN.run(GUNICORN_MODULE, "gunicorn.http.message.Request.force_close")


def test_handlers_not_looked_up_by_name_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Arbiter, "SIG_NAMES", {})
    with pytest.raises(AssertionError, match="SIG_NAMES"):
        GUNICORN.run(GUNICORN_MODULE, HANDLERS)


def test_a_base_hook_with_other_parameters_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_wsgi(self, reloader):
        pass

    monkeypatch.setattr("gunicorn.workers.base.Worker.load_wsgi", load_wsgi)
    _fails(GUNICORN, GUNICORN_MODULE, BASE, "Worker.load_wsgi(self, reloader)")


# -- coverage ------------------------------------------------------------------------------------


def test_a_reach_without_a_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    new = "gunicorn.workers.gthread.ThreadWorker.murder_keepalived"
    monkeypatch.setitem(gunicorn_internals.REACHES, new, "a new reach")
    expected = f"{GUNICORN_MODULE}: no shape check for the reach {new!r}"
    assert GUNICORN.problems({GUNICORN_MODULE}) == [expected]


def test_a_check_outliving_its_reach_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(celery_internals.REACHES, "celery.worker.state.should_stop")
    assert CORE.problems(HERE) == [
        f"{CELERY}: a shape check for 'celery.worker.state.should_stop', which is no reach (renamed?)"]
