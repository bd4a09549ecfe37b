"""A real worker given an unsupported billiard: Celery's stock stop for that part, one warning, no crash.

The worker's working directory is first on its ``sys.path`` (Celery puts it
there), so a ``billiard-4.2.0.dist-info`` in it is what ``importlib.metadata``
reports: the installed billiard's code is unchanged, only its version is out of
the declared range. The same worker without it runs stopright's bounded stop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

APP = """
from celery import Celery

import stopright

app = Celery("versions", broker="memory://")
stopright.install(app)
"""
NOT_APPLIED = "stopright: not applied:"


def _start_and_stop(cwd: Path) -> str:
    """Run the worker until it is ready, SIGTERM it, and return its output (it must exit 0 on its own)."""
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "versionsapp", "worker", "-c", "1",
                               "--loglevel=INFO"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        for line in worker.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if " ready." in line or time.monotonic() > deadline:
                break
        assert any(" ready." in line for line in lines), "".join(lines)
        worker.send_signal(signal.SIGTERM)
        rest, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0, "".join(lines) + rest
        return "".join(lines) + rest
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.mark.timeout(180)
def test_an_unsupported_billiard_keeps_celerys_stop_with_one_warning(tmp_path: Path) -> None:
    (tmp_path / "versionsapp.py").write_text(APP)
    supported = _start_and_stop(tmp_path)
    assert NOT_APPLIED not in supported, supported
    assert "graceful shutdown started (grace" in supported and "Warm shutdown" not in supported, supported

    fake = tmp_path / "billiard-4.2.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: billiard\nVersion: 4.2.0\n")
    unsupported = _start_and_stop(tmp_path)
    warnings = [line for line in unsupported.splitlines() if NOT_APPLIED in line]
    assert len(warnings) == 1, unsupported
    assert "the worker's bounded stop" in warnings[0], warnings
    assert "billiard 4.2.0 is outside the supported range >=4.3.2,<4.4" in warnings[0], warnings
    assert "worker: Warm shutdown (MainProcess)" in unsupported, unsupported  # Celery's own
    assert "graceful shutdown started (grace" not in unsupported, unsupported
    assert "Traceback" not in unsupported, unsupported
