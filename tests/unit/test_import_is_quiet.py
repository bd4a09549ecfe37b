"""Importing stopright changes nothing: no signal handler, thread, logging handler or at-fork hook.

Everything it does, it does when called (``install``, the gunicorn hooks), so
an app that imports it somewhere else (a shell, a script, its own
multiprocessing) meets stock Python.
"""

from __future__ import annotations

import subprocess
import sys

from tests.procset import ROOT

PROBE = r'''
import logging, os, pkgutil, signal, threading, importlib
from kombu import Connection, pools

def state():
    catchable = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]
    loggers = logging.Logger.manager.loggerDict.items()
    return ({s: signal.getsignal(s) for s in catchable}, threading.active_count(),
            {name: list(getattr(logger, "handlers", [])) for name, logger in loggers},
            list(logging.getLogger().handlers))

before = state()
import stopright
names = [m.name for m in pkgutil.walk_packages(stopright.__path__, "stopright.")
         if m.name not in ("stopright.outlive",)]  # a program (python -m), tested on its own
for name in names:
    importlib.import_module(name)
for name in stopright.__all__:
    getattr(stopright, name)
after = state()
assert before[0] == after[0], "signal handlers changed"
assert before[1] == after[1], "threads started"
assert before[3] == after[3], "root handlers changed"
added = {k: v for k, v in after[2].items() if v and k.startswith("stopright")}
assert not added, f"logging handlers added: {added}"

pools.connections[Connection("memory://")]  # the app's own publisher pool
pid = os.fork()
if pid == 0:  # the app's own multiprocessing: its pools are its business
    os._exit(0 if len(pools.connections) == 1 else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "a fork of the app's own lost its pools"
print(len(names), "modules")
'''


def test_importing_every_module_changes_nothing_in_the_process() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "SHUTDOWN_GRACE_SECONDS": "not a number"})
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) >= 20, done.stdout  # every module was imported
