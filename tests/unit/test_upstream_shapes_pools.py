"""Upgrade-shape tests: the reaches behind every pool (stopright/upstream/celery_pools.py, gevent.py,
eventlet.py), into billiard's pool child (billiard.py) and into CPython (cpython.py).

One check per key of each module's ``REACHES``, against the installed libraries. gevent's
and eventlet's hubs run in a child interpreter of their own (a hub started here would stay
in pytest's process).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import billiard.common
import billiard.pool
import pytest
from celery import concurrency
from celery.concurrency import asynpool, base, solo, thread
from celery.worker import worker as celery_worker

from stopright.upstream import billiard as billiard_internals
from stopright.upstream import celery as celery_internals
from stopright.upstream import celery_pools
from stopright.upstream import cpython as cpython_internals
from stopright.upstream import eventlet as eventlet_pool
from stopright.upstream import gevent as gevent_pool
from tests import shapes

CHECKS = shapes.Checks()
shape = CHECKS
HERE = {"stopright.upstream.cpython", "stopright.upstream.celery_pools", "stopright.upstream.gevent",
        "stopright.upstream.eventlet", "stopright.upstream.billiard"}
C = celery_internals


def _in_child(key: str, program: str, expected: str) -> None:
    """Run ``program`` in a fresh interpreter; it must print ``expected`` (its last line)."""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(program)],
                          capture_output=True, text=True, timeout=60)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0 or last != expected:
        shapes.fail(key, f"it printed {last!r} (rc {done.returncode}: {done.stderr.strip()[-300:]})",
                    "re-read the reach and its use in stopright/upstream/")


# -- which pool a worker runs (stopright/upstream/celery_pools.py) -------------------------------

P = celery_pools


@shape(P, "celery.worker.WorkController.pool_cls: set before worker_init, resolved after it")
def _(key: str) -> None:
    shapes.check_text(key, celery_worker.WorkController.setup_defaults,
                      ["self.pool_cls = either('worker_pool', pool, pool_cls)"],
                      "the pool of -P or worker_pool is known before worker_init")
    shapes.check_text(key, celery_worker.WorkController.setup_instance,
                      ["signals.worker_init.send(sender=self)",
                       "self.pool_cls = _concurrency.get_implementation(self.pool_cls)",
                       "self.blueprint.apply(self, **kwargs)"],
                      "worker_init may replace pool_cls: it is resolved and built after it")


@shape(P, "celery.concurrency.thread.TaskPool.executor / on_apply's ApplyResult.f / on_stop")
def _(key: str) -> None:
    shapes.check_calls(key, thread.TaskPool.on_stop, ["self.executor.shutdown(", "super().on_stop()"],
                       "Celery's stop is the executor's shutdown, then BasePool's")
    shapes.check_override(key, P.ThreadTaskPool, "on_stop")
    shapes.check_override(key, P.ThreadTaskPool, "on_apply")
    pool = P.ThreadTaskPool(limit=1)
    release = threading.Event()
    try:
        shapes.check_attributes(key, pool, ["executor"])
        result = pool.on_apply(release.wait, (30,), callback=lambda *a: None)
        shapes.check_attributes(key, result, ["f"], what="celery.concurrency.thread.ApplyResult")
        pool.abandon()
        started = time.monotonic()
        pool.on_stop()  # returns without the running task
        assert time.monotonic() - started < 10, f"{key}: on_stop waited for an abandoned thread"
    finally:
        release.set()


@shape(P, "celery.concurrency.ALIASES / get_implementation")
def _(key: str) -> None:
    shapes.check_attributes(key, concurrency, ["ALIASES", "get_implementation"])
    for kind in P.KINDS:
        if kind not in concurrency.ALIASES:
            shapes.fail(key, f"celery no longer has the pool {kind!r}", "update stopright/pools.py")
    assert P.resolve("prefork") == (celery_internals.TaskPool, "prefork"), key
    assert P.resolve("processes") == (celery_internals.TaskPool, "prefork"), key
    assert P.resolve("threads") == (P.ThreadTaskPool, "threads"), key
    assert P.resolve("solo") == (solo.TaskPool, "solo"), key
    assert P.resolve(celery_internals.TaskPool) == (celery_internals.TaskPool, "prefork"), key
    with pytest.raises(LookupError):
        P.resolve(base.BasePool)


# -- gevent (stopright/upstream/gevent.py) --------------------------------------------------------

G = gevent_pool
GREEN_POOL = """
{patch}
import threading, time
from celery.concurrency import {lib} as celerys
from stopright.upstream import {lib} as ours
pool = ours.TaskPool(limit=2)
pool.on_start()
blocked = pool._pool.spawn(time.sleep, 30)
done = []
ours.call_in_hub(done.append, "in the hub")
time.sleep(0.2)
pool.abandon()
started = time.monotonic()
pool.on_stop()
stopped = time.monotonic() - started < 10
ours.real_thread(lambda sleep: (sleep(0.01), done.append("in a thread")))
time.sleep(0.5)
print(done == ["in the hub", "in a thread"] and stopped)
"""


@shape(G, "celery.concurrency.gevent.TaskPool._pool (a gevent.pool.Pool) / on_stop")
def _(key: str) -> None:
    from celery.concurrency import gevent as celerys

    shapes.check_calls(key, celerys.TaskPool.on_stop, ["self._pool.join()"], "Celery's stop waits for all")
    shapes.check_override(key, G.TaskPool, "on_stop")
    shapes.check_text(key, celerys.TaskPool.on_start, ["self._pool = self.Pool(self.limit)"],
                      "the pool's greenlets are in _pool")
    _in_child(key, GREEN_POOL.format(lib="gevent", patch="import gevent.monkey; gevent.monkey.patch_all()"),
              "True")


@shape(G, "gevent.get_hub().loop.run_callback")
def _(key: str) -> None:
    _in_child(key, "import gevent; done = []; gevent.get_hub().loop.run_callback(done.append, 1); "
                   "gevent.sleep(0.05); print(done == [1])", "True")


@shape(G, "gevent.monkey.get_original('_thread', 'start_new_thread') / ('time', 'sleep')")
def _(key: str) -> None:
    _in_child(key, "import gevent.monkey; gevent.monkey.patch_all(); import _thread, time; "
                   "o = gevent.monkey.get_original; "
                   "print(o('_thread', 'start_new_thread') is not _thread.start_new_thread "
                   "and o('time', 'sleep') is not time.sleep)", "True")


# -- eventlet (stopright/upstream/eventlet.py) ----------------------------------------------------

E = eventlet_pool


@shape(E, "celery.concurrency.eventlet.TaskPool._pool (an eventlet GreenPool) / on_stop")
def _(key: str) -> None:
    from celery.concurrency import eventlet as celerys

    shapes.check_text(key, celerys.TaskPool.on_stop,
                      ["signals.eventlet_pool_preshutdown.send(sender=self)", "self._pool.waitall()",
                       "signals.eventlet_pool_postshutdown.send(sender=self)"],
                      "our on_stop sends the same signals around its bounded wait")
    shapes.check_override(key, E.TaskPool, "on_stop")
    patch = "import eventlet; eventlet.monkey_patch()"
    _in_child(key, GREEN_POOL.format(lib="eventlet", patch=patch), "True")


@shape(E, "eventlet.hubs.get_hub().schedule_call_global")
def _(key: str) -> None:
    _in_child(key, "import eventlet, eventlet.hubs; done = []; "
                   "eventlet.hubs.get_hub().schedule_call_global(0, done.append, 1); eventlet.sleep(0.05); "
                   "print(done == [1])", "True")


@shape(E, "eventlet.patcher.original('_thread') / ('time')")
def _(key: str) -> None:
    _in_child(key, "import eventlet; eventlet.monkey_patch(); import _thread, time; "
                   "from eventlet.patcher import original as o; "
                   "print(o('_thread').start_new_thread is not _thread.start_new_thread "
                   "and o('time').sleep is not time.sleep)", "True")


# -- billiard (stopright/upstream/billiard.py) ---------------------------------------------------

B = billiard_internals


@shape(B, "billiard.pool.Worker._do_exit")
def _(key: str) -> None:
    shapes.check_digest(key, billiard.pool.Worker._do_exit, B.DO_EXIT_DIGEST,
                        "stopright/upstream/billiard.py")
    shapes.check_override(key, C.Worker, "_do_exit")
    shapes.check_self_attributes(key, B.QuickExit._do_exit, billiard.pool.Worker)
    if asynpool.Worker._do_exit is not billiard.pool.Worker._do_exit:
        shapes.fail(key, "celery changed asynpool.Worker: it has a _do_exit of its own",
                    "the copy in stopright/upstream/billiard.py follows billiard's; re-read both")
    shapes.check_calls(key, billiard.pool.Worker.__call__, ["self.workloop(", "self._do_exit("],
                       "the child leaves through _do_exit once its work loop ends")


@shape(B, "billiard.pool.Worker.after_fork: the initializer, then reset_signals (keeps SIG_IGN)")
def _(key: str) -> None:
    shapes.check_override(key, C.Worker, "after_fork")
    shapes.check_text(key, billiard.pool.Worker.after_fork, ["self.initializer(*", "reset_signals("],
                      "worker_process_init runs before billiard sets the child's signal handlers")
    shapes.check_calls(key, billiard.pool.Worker.__call__, ["self.after_fork()", "self.workloop("],
                       "the child's handlers are set before its work loop")
    shapes.check_text(key, billiard.common._should_override_term_signal, ["current != signal.SIG_IGN"],
                      "an ignored stop signal is left ignored (the child's protection until ours is set)")


@shape(B, "billiard.pool.Pool.Worker")
def _(key: str) -> None:
    shapes.check_attributes(key, billiard.pool.Pool, ["Worker"])
    assert billiard.pool.Pool.Worker is billiard.pool.Worker, key
    shapes.check_calls(key, billiard.pool.Pool._create_worker_process, ["self.Worker("],
                       "each child is built from the pool's class attribute")
    assert C.AsynPool.Worker.__mro__[1] is B.QuickExit, f"{key}: QuickExit is not first in the Worker's MRO"


@shape(B, "billiard.pool.DEATH, EX_OK, EX_FAILURE, TERM_SIGNAL")
def _(key: str) -> None:
    shapes.check_attributes(key, billiard.pool, ["DEATH", "EX_OK", "EX_FAILURE", "TERM_SIGNAL"])
    assert billiard.pool.TERM_SIGNAL in set(signal.Signals), key


# -- CPython (stopright/upstream/cpython.py) -----------------------------------------------------


@shape(cpython_internals, "atexit._run_exitfuncs")
def _(key: str) -> None:
    import atexit

    shapes.check_attributes(key, atexit, ["_run_exitfuncs"])
    # A builtin whose docstring differs between Pythons (3.13 dropped the signature line):
    # what it does is checked instead, in a child: it runs the handlers once, newest first.
    program = ("import atexit; atexit.register(print, 'first'); atexit.register(print, 'second'); "
               "atexit._run_exitfuncs(); print('after')")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or done.stdout.split() != ["second", "first", "after"]:
        shapes.fail(key, f"CPython changed atexit._run_exitfuncs (it printed {done.stdout.split()}, "
                         f"rc {done.returncode}: {done.stderr.strip()[-200:]})",
                    "re-read it and stopright/upstream/cpython.py run_atexit_handlers")


class _Raised(BaseException):
    pass


def _busy(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@shape(cpython_internals, "ctypes.pythonapi.PyThreadState_SetAsyncExc")
def _(key: str) -> None:
    caught = []
    inside = threading.Event()

    def spin() -> None:
        try:
            inside.set()
            _busy(30)  # a frame of its own, as a task's code is (CPython 3.13.0 lets an exception raised
            # at a bare `while ...: pass` skip the handler of that frame's own try)
        except _Raised:
            caught.append(True)

    spinner = threading.Thread(target=spin)
    spinner.start()
    assert inside.wait(30)
    assert cpython_internals.raise_in_thread(spinner.ident, _Raised), f"{key}: no such thread?"
    spinner.join(30)
    assert caught == [True], f"{key}: the exception did not reach the thread"
    assert cpython_internals.raise_in_thread(spinner.ident, _Raised) is False, f"{key}: a gone thread"


@shape(cpython_internals, "weakref.WeakSet.data")
def _(key: str) -> None:
    class Item:
        pass

    kept = [Item(), Item()]
    items: weakref.WeakSet = weakref.WeakSet(kept)
    shapes.check_attributes(key, items, ["data"])
    assert all(isinstance(ref, weakref.ref) for ref in items.data), f"{key}: WeakSet.data holds no refs"
    assert sorted(map(id, cpython_internals.weakset_snapshot(items))) == sorted(map(id, kept)), key


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "key"), CHECKS.cases(), ids=[key for _, key in CHECKS.cases()])
def test_upstream_shape(module: str, key: str) -> None:
    CHECKS.run(module, key)


def test_every_reach_has_a_shape_check() -> None:
    assert not CHECKS.problems(HERE), "\n".join(CHECKS.problems(HERE))
