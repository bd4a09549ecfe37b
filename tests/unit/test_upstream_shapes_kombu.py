"""Upgrade-shape tests: every reach of stopright/upstream/ into billiard, kombu and CPython.

One check per key of each module's ``REACHES`` (Celery's: test_upstream_shapes.py), against
the installed library, with real objects where they are cheap (a kombu pool on ``memory://``).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import billiard.compat
import billiard.pool
import pytest
from celery.concurrency import asynpool
from kombu import Connection, pools
from kombu.connection import ConnectionPool
from kombu.resource import Resource

from stopright.upstream import billiard as billiard_internals
from stopright.upstream import celery as celery_internals
from stopright.upstream import cpython as cpython_internals
from stopright.upstream import kombu as kombu_internals
from tests import shapes

CHECKS = shapes.Checks()
shape = CHECKS
HERE = {"stopright.upstream.billiard", "stopright.upstream.kombu", "stopright.upstream.cpython"}
C = celery_internals

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


# -- kombu (stopright/upstream/kombu.py) ---------------------------------------------------------

K = kombu_internals


def _pool() -> ConnectionPool:
    return ConnectionPool(Connection("memory://"), limit=2)


@shape(K, "kombu.resource.Resource._dirty")
def _(key: str) -> None:
    pool = _pool()
    shapes.check_attributes(key, pool, ["_dirty"])
    conn = pool.acquire()
    try:
        assert pool._dirty == {conn}, f"{key}: an acquired connection is not in Resource._dirty"
    finally:
        conn.release()
    assert not pool._dirty, f"{key}: a released connection is still in Resource._dirty"


@shape(K, "kombu.resource.Resource._resource")
def _(key: str) -> None:
    pool = _pool()
    shapes.check_attributes(key, pool, ["_resource"])
    shapes.check_attributes(key, pool._resource, ["queue"], what="Resource._resource (a LifoQueue)")
    assert len(pool._resource.queue) == 2, f"{key}: the free slots are not in Resource._resource.queue"
    assert not any(isinstance(r, Connection) for r in pool._resource.queue), \
        f"{key}: an unopened slot is a Connection now (close_pooled_connections would open it to close it)"
    conn = pool.acquire()
    conn.release()
    assert conn in pool._resource.queue, f"{key}: a released connection is not back in _resource.queue"


@shape(K, "kombu.resource.Resource._closed")
def _(key: str) -> None:
    shapes.check_text(key, Resource.force_close_all, ["if self._closed:\nreturn"],
                      "kombu's after-fork reset skips a pool marked closed (forget_inherited)")
    pool = _pool()
    conn = pool.acquire()
    held = K._empty(pool)
    assert conn in held and not pool._dirty and not pool._resource.queue, key
    with pytest.raises(RuntimeError):
        pool.acquire()  # a publish racing the stop fails at once
    pool._dirty.add(conn)
    pool.force_close_all()
    assert conn in pool._dirty, f"{key}: force_close_all no longer returns at once on a closed pool"


@shape(K, "kombu.Connection._close")
def _(key: str) -> None:
    shapes.check_signature(key, Connection._close, "self")
    shapes.check_calls(key, Connection.release, ["self._close()"], "release() outside a pool is _close()")
    conn = Connection("memory://")
    conn.connect()
    conn._close()
    assert not conn.connected, f"{key}: Connection._close() left the connection open"


@shape(K, "kombu.pools.connections / kombu.pools.producers")
def _(key: str) -> None:
    shapes.check_attributes(key, pools, ["connections", "producers"])
    for group in (pools.connections, pools.producers):
        assert isinstance(group, dict), f"{key}: {type(group).__name__} is no dict of pools any more"
    assert isinstance(pools.connections.create(Connection("memory://"), 2), Resource), key
    assert issubclass(pools.ProducerPool, Resource), key


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


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "key"), CHECKS.cases(), ids=[key for _, key in CHECKS.cases()])
def test_upstream_shape(module: str, key: str) -> None:
    CHECKS.run(module, key)


def test_every_reach_has_a_shape_check() -> None:
    """A new reach cannot land without its check."""
    problems = CHECKS.problems(HERE)
    assert not problems, "\n".join(problems)
