"""billiard's pool child: its exit without the fixed one-second sleep.

After ``worker_process_shutdown`` (where stopright closes the child's
connections), billiard's ``Worker._do_exit`` reports DEATH to the parent
through a pipe, with SIGTERM blocked, then sleeps 1 s before ``os._exit``:
a whole second added to every worker stop. :class:`QuickExit` is billiard's
method without that sleep; the DEATH message is in the pipe before the
child exits, so the parent reads it either way. Mixed into the pool's
``Worker`` class (a class attribute of the pool: stopright/upstream/celery.py).

The same class runs :data:`after_signal_reset` once billiard has set the
child's signals: billiard's ``after_fork`` runs the pool's initializer
(Celery's, which sends ``worker_process_init``), then replaces every handler
of SIGTERM, SIGQUIT, SIGHUP and SIGUSR1 that is not ``SIG_IGN`` with its own
``sys.exit``. A handler the child needs on those signals is set after it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from billiard.pool import DEATH, EX_FAILURE, EX_OK, TERM_SIGNAL

#: What this module relies on that billiard does not promise (checked by tests/unit/test_upstream_shapes.py).
REACHES = {
    "billiard.pool.Worker._do_exit": "copied below without its time.sleep(1); digest pinned",
    "billiard.pool.Pool.Worker": "the class the pool instantiates per child (a class attribute)",
    "billiard.pool.DEATH, EX_OK, EX_FAILURE, TERM_SIGNAL": "the constants the copy uses",
    "billiard.pool.Worker.after_fork: the initializer, then reset_signals (keeps SIG_IGN)":
        "our after_fork sets the child's stop handlers after billiard's",
}
#: Called in each pool child once billiard has reset its signals (after ``worker_process_init``).
after_signal_reset: list[Callable[[], object]] = []
#: billiard 4.3.2's ``Worker._do_exit`` (its stopright.upstream.source_digest), which the copy follows.
DO_EXIT_DIGEST = "365d96d5485a8b34"


class QuickExit:
    """Pool child: billiard's ``_do_exit``, minus ``time.sleep(1)`` before ``os._exit``."""

    on_exit: Callable[[int, int], object] | None
    outq: Any

    def after_fork(self) -> None:
        """billiard's (the initializer, then its signal handlers), then :data:`after_signal_reset`."""
        super().after_fork()  # type: ignore[misc]
        for call in after_signal_reset:
            call()

    def _do_exit(self, pid: int, exitcode: int | None, exc: BaseException | None = None) -> None:
        if exitcode is None:
            exitcode = EX_FAILURE if exc else EX_OK

        if self.on_exit is not None:
            self.on_exit(pid, exitcode)  # worker_process_shutdown: the child's registry closes

        if sys.platform != "win32":
            try:
                # on_death's TERM_SIGNAL arriving here would leave outq locked.
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, {TERM_SIGNAL})
                try:
                    self.outq.put((DEATH, (pid, exitcode)))
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                # billiard: time.sleep(1)
            finally:
                os._exit(exitcode)
        else:
            os._exit(exitcode)
