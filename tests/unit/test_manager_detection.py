"""stopright.signals._manager_pid and stop_with_parent: the manager a program follows, and only it.

honcho 2.0 runs each Procfile line as ``sh -c`` under a per-entry reader, a
``multiprocessing.Process`` (a fork of honcho on Linux up to Python 3.13;
forkserver from 3.14): both outlive honcho. The program must follow honcho
itself, and never a process above it (``nohup honcho start &`` outlives the
shell that started it). Real processes: real honcho, real multiprocessing.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PRINT_MANAGER = ("import os; from stopright import signals; "
                 "stat = open('/proc/%d/stat' % os.getppid()).read(); "
                 "print('manager', signals._manager_pid(), 'grandparent', stat.rsplit(')', 1)[1].split()[1], "
                 "flush=True)")
#: A manager shaped like honcho: each line in ``sh -c`` under a multiprocessing child that waits for it.
MANAGER = """\
import multiprocessing, subprocess, sys, time

def run(line):
    subprocess.Popen(['/bin/sh', '-c', line]).wait()

if __name__ == '__main__':
    print('pid', __import__('os').getpid(), flush=True)
    child = multiprocessing.get_context(sys.argv[1]).Process(target=run, args=(sys.argv[2],))
    child.start()
    child.join()
"""


def program_line(code: str) -> str:
    return f"{sys.executable} -c \"{code}\""  # no exec: the shell stays, as under honcho


def words(out: str, key: str) -> int:
    for line in out.splitlines():
        parts = line.split()
        if key in parts:
            return int(parts[parts.index(key) + 1])
    raise AssertionError(f"no {key!r} in:\n{out}")


def test_under_real_honcho_the_manager_is_honcho_not_its_reader(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text(f"a: {program_line(PRINT_MANAGER)}\n")
    honcho = subprocess.Popen([sys.executable, "-m", "honcho", "start", "--no-colour"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              text=True)
    out, _ = honcho.communicate(timeout=60)
    assert words(out, "manager") == honcho.pid, out
    # The line's shell stands under honcho's reader (a fork of honcho), not under honcho.
    assert words(out, "grandparent") != honcho.pid, out
    assert "a.1 stopped (rc=0)" in out, out


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_the_walk_passes_multiprocessing_children_and_stops_at_the_manager(tmp_path: Path,
                                                                           method: str) -> None:
    script = tmp_path / "manager.py"
    script.write_text(MANAGER)
    # The manager is started by a shell that stays (a terminal's, or `nohup manager &`): not walked into.
    line = f"{sys.executable} {script} {method} {shlex.quote(program_line(PRINT_MANAGER))}; true"
    outer = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, timeout=60)
    manager = words(outer.stdout, "pid")
    assert words(outer.stdout, "manager") == manager, outer.stdout + outer.stderr
    assert words(outer.stdout, "grandparent") != manager  # a multiprocessing child stood between


def test_a_program_stops_when_the_manager_behind_a_fork_and_a_shell_dies(tmp_path: Path) -> None:
    """honcho SIGKILLed with no terminal: its reader and the `sh -c` live on; the program must stop."""
    program = tmp_path / "program.py"
    program.write_text(
        "import signal, sys, time; from stopright import signals\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('stopping', flush=True), sys.exit(0)))\n"
        "signals.stop_with_parent(); print('up', flush=True); time.sleep(60)\n")
    out = tmp_path / "out"
    script = tmp_path / "manager.py"
    script.write_text(MANAGER)
    manager = subprocess.Popen([sys.executable, str(script), "fork", f"{sys.executable} {program} > {out}"],
                               stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "up" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        manager.kill()
        manager.wait()
        while "stopping" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_text().split() == ["up", "stopping"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the reader-like child, if the program did not stop
            os.killpg(manager.pid, signal.SIGKILL)
