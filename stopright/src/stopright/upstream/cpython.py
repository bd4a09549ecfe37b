"""CPython's internals stopright relies on: its exit path, raising in another thread, WeakSet's refs.

A process that leaves with ``os._exit`` (a gunicorn worker's ``worker_exit``,
the Celery worker's stop) would skip every ``atexit`` handler too: an error
reporter's or a tracer's flush, logging's. :func:`run_atexit_handlers` runs
them first, as a normal exit does. :func:`raise_in_thread` is the threads
pool's hand-back; :func:`weakset_snapshot` reads Celery's running requests.
"""

from __future__ import annotations

import atexit
import ctypes
import weakref
from typing import TypeVar

#: What this module relies on that CPython does not promise (checked by tests/unit/test_upstream_shapes.py).
REACHES = {
    "atexit._run_exitfuncs": "runs (and clears) every registered handler, newest first, as at exit",
    "ctypes.pythonapi.PyThreadState_SetAsyncExc":
        "raises an exception in another thread at its next bytecode (the threads pool's hand-back)",
    "weakref.WeakSet.data": "the set of weak references behind a WeakSet, copied in one step",
}

T = TypeVar("T")


def run_atexit_handlers() -> None:
    """What a normal exit runs first: every ``atexit`` handler, newest first (logging's flush among them).

    ``atexit._run_exitfuncs`` is what the interpreter itself calls at exit;
    it also unregisters them, so none runs twice.
    """
    atexit._run_exitfuncs()


def raise_in_thread(ident: int, exc: type[BaseException]) -> bool:
    """Raise ``exc`` in the thread ``ident`` at its next bytecode; False if no such thread.

    CPython checks for it between bytecodes: a thread blocked in a C call
    (``time.sleep``, a socket read) gets it only when that call returns.
    """
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc))
    if done > 1:  # more than one thread state: undo, as the C API's documentation asks
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
        return False
    return bool(done == 1)


def weakset_snapshot(items: weakref.WeakSet[T] | set[T]) -> list[T]:
    """The live members of ``items``, read in one step another thread cannot interleave with.

    Iterating a WeakSet runs Python code between members, so a thread that
    adds one meanwhile makes it raise ``RuntimeError`` ("changed size during
    iteration"); copying its set of references is one C call under the GIL.
    """
    if not isinstance(items, weakref.WeakSet):
        return list(items)
    refs = list(items.data)  # type: ignore[attr-defined]  # its set of references (CPython's weakref.py)
    return [item for item in (ref() for ref in refs) if item is not None]
