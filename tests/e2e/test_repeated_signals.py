"""A stop signal repeated after a program's shutdown is complete (foreman: SIGINT to the group,
then SIGTERM to each child; honcho: the group's SIGTERM, then the `sh -c` wrapper's death).

Once its shutdown is complete a program only has to exit, but CPython's finalization
puts the default action back on every signal with a Python handler: a repeat landing
in the interpreter's teardown killed the process (``terminated by SIGTERM`` where
foreman expected ``exited with code 0``). Here the repeats come every few
milliseconds from "shutdown complete" until the process is gone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.procset import ROOT, ProcessSet, free_port

PROGRAMS = {
    "beat": (["-m", "celery", "--app", "tasks.beat_app", "beat", "--loglevel", "INFO"], "beat: Starting"),
    "worker": (["-m", "celery", "--app", "tasks.worker", "worker", "--loglevel", "INFO",
                "--without-mingle", "--without-gossip"], r"ready\."),
    "web": (["-m", "gunicorn", "--config", "gunicorn.conf.py"], "Booting worker"),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_repeats_after_shutdown_complete_do_not_kill(tmp_path: Path, redis_url: str, name: str) -> None:
    env = ProcessSet(tmp_path, env={"REDIS_URL": redis_url, "PORT": str(free_port())}).env
    args, ready = PROGRAMS[name]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    complete = threading.Event()
    started = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if ready.replace("\\", "") in line:
                started.set()
            if "shutdown complete" in line and ("web[" in line or name != "web"):
                complete.set()  # web: the master's line (a worker's comes first)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(60), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert complete.wait(30), "".join(lines)
        repeats = 0
        while proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            repeats += 1
            time.sleep(0.002)
        reader.join(10)
        out = "".join(lines)
        assert proc.returncode == 0, (proc.returncode, repeats, out)
        assert "Traceback" not in out, out
        assert "corrupted" not in out, out  # beat: a signal as its store opened made Celery delete it
        print(f"{name}: {repeats} repeated SIGTERMs after shutdown complete, exit {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(10)
        if proc.stdout is not None:
            proc.stdout.close()
