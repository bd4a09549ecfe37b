"""``gunicorn -c python:stopright.gunicorn_hooks`` with an app of its own: the app's ``atexit`` handlers run.

The worker's ``worker_exit`` hook leaves with ``os._exit`` after closing its
connections (the interpreter's teardown only delays the master); an error
reporter's or tracer's flush registered with ``atexit`` (Sentry,
OpenTelemetry) must still run first. The app here registers one that writes
a file named after the worker's pid. No line of the app knows stopright: the
hooks come from the command line, as examples/foreign's Procfile has it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.procset import free_port

APP = '''
import atexit, os, sys

def flush():
    with open(os.path.join(os.environ["ATEXIT_DIR"], str(os.getpid())), "w") as f:
        f.write("flushed")

atexit.register(flush)
print(f"app loaded in {os.getpid()}", file=sys.stderr, flush=True)

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
'''
WORKERS = 2


@pytest.fixture
def gunicorn(tmp_path: Path):
    (tmp_path / "atexitapp.py").write_text(APP)
    marks = tmp_path / "marks"
    marks.mkdir()
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SHUTDOWN_", "HONCHO_"))},
           "ATEXIT_DIR": str(marks), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:stopright.gunicorn_hooks",
                             "--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS),
                             "--no-control-socket", "atexitapp:app"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout),
                              daemon=True)
    reader.start()
    try:
        yield proc, port, marks, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(5)
        proc.stdout.close()


def loaded_workers(lines: list[str]) -> set[int]:
    return {int(m[1]) for line in list(lines) if (m := re.search(r"app loaded in (\d+)", line))}


def test_the_apps_atexit_handlers_run_in_every_worker(gunicorn) -> None:
    proc, port, marks, lines = gunicorn
    deadline = time.monotonic() + 60
    while len(loaded_workers(lines)) < WORKERS:
        assert proc.poll() is None and time.monotonic() < deadline, "\n".join(lines)
        time.sleep(0.05)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
        assert int(answer.read()) in loaded_workers(lines)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, "\n".join(lines)

    workers = loaded_workers(lines)
    assert {int(p.name) for p in marks.iterdir()} == workers, "\n".join(lines)
    assert all((marks / str(pid)).read_text() == "flushed" for pid in workers)
    # stopright's sequence shows in gunicorn's log although the app configures no logging.
    text = "\n".join(lines)
    for pid in [*workers, proc.pid]:
        assert re.search(rf"\[{pid}\] \[INFO\] shutdown complete in \d+ ms", text), text
    assert re.search(rf"\[{proc.pid}\] \[INFO\] signal received: SIGTERM", text), text
