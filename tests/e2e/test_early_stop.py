"""A stop signal in a program's first seconds (issue 8: crash loops, fast rollouts).

Celery installs its stop handlers only once it has imported everything and
printed its banner (1 to 5 s on a loaded machine). Until then a SIGTERM met
the default action (death by signal; as PID 1 of a container, dropped, then
SIGKILL at the platform's timeout). Here it is handled from the first import
of the program's app module.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procset import ROOT, ProcessSet

PROGRAMS = {
    "worker": ["--app", "tasks.worker", "worker", "--without-mingle", "--without-gossip"],
    "beat": ["--app", "tasks.beat_app", "beat"],
}


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` (``SigCgt`` in /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize("name", sorted(PROGRAMS))
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT])
def test_a_stop_signal_during_start_up_exits_0_at_once(tmp_path: Path, name: str, signum: int) -> None:
    env = ProcessSet(tmp_path).env  # a var/ of its own; no broker needed this early
    proc = subprocess.Popen([sys.executable, "-m", "celery", *PROGRAMS[name], "--loglevel", "INFO"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not catches(proc.pid, signum):
            assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
            time.sleep(0.002)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert f"{signal.Signals(signum).name} before start-up finished: exiting" in text, text
