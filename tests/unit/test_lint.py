"""The code passes ruff's checks (configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from tests.procset import ROOT


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
