"""CPython's own exit path, run by hand where a process leaves with ``os._exit``.

A gunicorn worker that leaves with ``os._exit`` (stopright/gunicorn_hooks.py
``worker_exit``, to skip the interpreter's teardown) would skip every
``atexit`` handler too: an error reporter's or a tracer's flush, logging's.
:func:`run_atexit_handlers` runs them first, as a normal exit does.
"""

from __future__ import annotations

import atexit

#: What this module relies on that CPython does not promise (checked by tests/unit/test_upstream_shapes.py).
REACHES = {
    "atexit._run_exitfuncs": "runs (and clears) every registered handler, newest first, as at exit",
}


def run_atexit_handlers() -> None:
    """What a normal exit runs first: every ``atexit`` handler, newest first (logging's flush among them).

    ``atexit._run_exitfuncs`` is what the interpreter itself calls at exit;
    it also unregisters them, so none runs twice.
    """
    atexit._run_exitfuncs()
