"""stopright/signals.py: chain_signal, report_signals, log_stacks and stop_with_parent.

A chained handler must keep the previous one (or the default action) working; a program
started through ``sh -c`` (honcho, foreman) must follow the manager behind the shell.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from stopright import signals as stop_signals
from tests.unit.shutdown_helpers import messages

# -- chain_signal ------------------------------------------------------------------------


@pytest.fixture
def sigusr1():
    original = signal.getsignal(signal.SIGUSR1)
    try:
        yield signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_chain_signal_runs_before_then_the_previous_handler(sigusr1):
    calls = []
    signal.signal(sigusr1, lambda sig, frame: calls.append(("previous", sig)))

    stop_signals.chain_signal(sigusr1, lambda sig: calls.append(("before", sig)))
    os.kill(os.getpid(), sigusr1)

    assert calls == [("before", sigusr1), ("previous", sigusr1)]


def test_chain_signal_with_an_ignored_previous_handler_runs_before_only(sigusr1):
    calls = []
    signal.signal(sigusr1, signal.SIG_IGN)

    stop_signals.chain_signal(sigusr1, lambda sig: calls.append(sig))
    os.kill(os.getpid(), sigusr1)

    assert calls == [sigusr1]


def test_chain_signal_with_report_signals_logs_the_signal_from_a_thread(sigusr1, registry, shutdown_logs):
    previous = []
    signal.signal(sigusr1, lambda sig, frame: previous.append(sig))

    stop_signals.chain_signal(sigusr1, stop_signals.report_signals(registry))
    os.kill(os.getpid(), sigusr1)

    assert registry.shutting_down.wait(10)  # set by the reporting thread, after its two lines
    assert messages(shutdown_logs)[:2] == ["signal received: SIGUSR1", "graceful shutdown started"]
    assert previous == [sigusr1]


def test_chain_signal_keeps_the_default_action_of_an_unhandled_signal():
    # SIG_DFL for SIGUSR1 is "terminate": after the chained callback, the process still dies by it.
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            stop_signals.chain_signal(signal.SIGUSR1, lambda sig: os.write(write_fd, b"before"))
            os.kill(os.getpid(), signal.SIGUSR1)
            os.write(write_fd, b"+survived")
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as pipe:
        written = pipe.read()
    assert written == b"before"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1


# -- the stacks of every thread (a phase that overran) ---------------------------


def test_log_stacks_logs_every_thread_by_name(shutdown_logs):
    parked = threading.Event()
    thread = threading.Thread(target=parked.wait, name="parked-for-the-test", daemon=True)
    thread.start()
    try:
        stop_signals.log_stacks("phase overran")
    finally:
        parked.set()
        thread.join()
    logged = messages(shutdown_logs)
    assert any(m.startswith("phase overran: stack of thread parked-for-the-test:") and "wait" in m
               for m in logged), logged
    assert any(m.startswith("phase overran: stack of thread MainThread:") for m in logged), logged


# -- the manager a program follows (stop_with_parent) --------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PRINT_MANAGER = ("import os; from stopright import signals as stop_signals; "
                  "print(os.getppid(), stop_signals._manager_pid())")


@pytest.mark.parametrize(("line", "wrapped"), [
    ("{python} -c '{code}'", True),  # honcho: dash forks the program and waits
    ("{python} -c '{code}'; true", True),
    ("exec {python} -c '{code}'", False),  # the shell is replaced: our parent is the manager
])
def test_the_manager_is_the_shells_parent_when_a_sh_c_stands_between(line, wrapped):
    import subprocess
    import sys

    command = line.format(python=sys.executable, code=_PRINT_MANAGER)
    shell = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    out, _ = shell.communicate(timeout=30)
    parent, manager = map(int, out.split())
    assert manager == os.getpid()
    assert parent == (shell.pid if wrapped else os.getpid())


def test_a_program_stops_when_the_manager_behind_its_sh_c_dies(tmp_path):
    # honcho SIGKILLed: its helper (the manager here) dies, the `sh -c` lives on.
    import subprocess
    import sys
    import time

    program = ("import signal, sys, time; from stopright import signals as stop_signals\n"
               "signal.signal(signal.SIGTERM, lambda *_: (print('stopping', flush=True), sys.exit(0)))\n"
               "stop_signals.stop_with_parent(); print('up', flush=True); time.sleep(60)")
    script = tmp_path / "program.py"
    script.write_text(program)
    out = tmp_path / "out"
    manager = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen(['/bin/sh', '-c', '{sys.executable} {script} > {out}'])\n"
        "time.sleep(60)")])
    try:
        deadline = time.monotonic() + 20
        while "up" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        manager.kill()
        manager.wait()
        while "stopping" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_text().split() == ["up", "stopping"]
    finally:
        manager.kill()
