"""The README's first command: ``scripts/start`` sets up and starts the whole set, on each Python.

For the Python running the tests, ``scripts/start`` uses the venv the tests
run in (``VENV``, else ``.venv``). For each other supported version found on
the machine (tests/pythons.py), it makes ``.venv-3.X`` itself on its first
run (``PYTHON=... VENV=.venv-3.X``): the fresh-machine path on that version.
A version not found is skipped, unless ``REQUIRE_PYTHONS`` names it
(.ci/run requires 3.13): then it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.e2e.checks import assert_clean_stop
from tests.procset import ROOT, ProcessSet
from tests.pythons import SUPPORTED, find_python, how_to_get, running


def quick_start_env(version: str) -> dict[str, str]:
    """VENV and PYTHON for ``scripts/start`` on ``version``; skips (or fails) when there is none."""
    if version == running():
        return {"PYTHON": sys.executable}  # VENV: this suite's own (PYTHON is used only to make it)
    python = find_python(version)
    if python is None:
        if version in os.environ.get("REQUIRE_PYTHONS", "").split():
            pytest.fail(f"REQUIRE_PYTHONS names {version}, but {how_to_get(version)}")
        pytest.skip(how_to_get(version))
    return {"PYTHON": python, "VENV": str(ROOT / f".venv-{version}")}


def python_versions(ps: ProcessSet) -> set[str]:
    """The versions of the interpreters that run the set's Python processes (honcho included)."""
    exes = set()
    for process in ps.snapshot():
        try:
            exe = process.exe()
        except psutil.Error:
            continue
        if Path(exe).name.startswith("python"):
            exes.add(exe)
    assert exes, "no Python process in the set"
    return {subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], check=True,
                           capture_output=True, text=True, timeout=30).stdout.strip() for exe in exes}


@pytest.mark.parametrize("version", SUPPORTED)
def test_scripts_start_runs_the_set_and_ctrl_c_stops_it(tmp_path: Path, version: str) -> None:
    env = quick_start_env(version)
    ps = ProcessSet(tmp_path, command=[str(ROOT / "scripts" / "start")], runs_honcho=True, env=env)
    try:
        ps.start()
        ps.wait_ready(timeout=300)  # the first run may install the requirements
        assert python_versions(ps) == {version}
        job_id = ps.submit("echo", value={"quick": "start"})
        assert ps.job(job_id, wait=20)["result"] == {"quick": "start"}
        rc, _ = ps.stop_and_wait("ctrl_c")
        assert_clean_stop(ps, rc, 130)
    finally:
        ps.cleanup()
