"""foreman (Debian's ruby-foreman 0.87): `foreman start` stops the busy set cleanly, its exports start it.

``foreman start`` runs every entry in its own process group, so a typed ^C
reaches every process (SIGINT), then foreman sends SIGTERM to each entry's
main process and SIGKILL 5 s later (``-t``). SIGTERM to foreman: only the
SIGTERM to each main process. Both must leave no job lost or late, no
request reset or 5xx, no SIGKILL, nothing running.

Its exports prefix nothing (supervisord) or ``exec -a NAME`` (systemd) to
each Procfile command: now that the Procfile has no ``exec`` of its own,
``foreman export supervisord`` run under supervisord starts every entry
(when supervisord itself finds the virtualenv's programs: its ``command=``
is looked up on supervisord's own PATH). ``foreman export systemd`` writes
``ExecStart=/bin/bash -lc '...'``: the login shell resets PATH, so from a
virtualenv the program is not found (exit 127), which ``systemd-analyze
verify`` cannot see.
"""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.procset import ROOT, AppClient, ProcessSet, free_port
from tests.servers import missing
from tests.supervised import BIN, SERVICE_ENV, Supervisord, write_env
from tests.units import exec_start, parse_unit, verify
from tests.workload import Workload, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

JOB_SECONDS = 8


def foreman() -> str:
    found = shutil.which("foreman")
    if found is None:
        missing("foreman is not installed (Debian package ruby-foreman)", "REQUIRE_FOREMAN")
    return found


def _foreman_set(tmp_path: Path, env_file: Path) -> ProcessSet:
    ps = ProcessSet(tmp_path, env={"WORKER_CONCURRENCY": "6"}, runs_honcho=True, command=[])
    ps.command = [foreman(), "start", "-f", str(ROOT / "Procfile"), "-d", str(ROOT),
                  "-e", str(env_file), "-p", str(ps.port), "-t", "5"]
    return ps


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_foreman_start_busy_stop(tmp_path: Path, how: str) -> None:
    env_file = write_env(tmp_path / "empty.env", {})
    sets = [_foreman_set(tmp_path, env_file)]
    try:
        ps = sets[0]
        ps.start()
        ps.wait_ready()
        load = Workload(ps, jobs=6, job_seconds=JOB_SECONDS)
        load.start()
        ps.snapshot()
        _rc, elapsed = ps.stop_and_wait(how, timeout=30)
        outcomes = load.finish()
        out = ps.output
        assert f"{'SIGINT' if how == 'ctrl_c' else 'SIGTERM'} received" in out, out
        assert "SIGKILL" not in out, out
        for name in ("web", "worker", "beat", "broker"):
            assert re.search(rf"{name}\.1\s*\| exited with code 0", out), f"{name}:\n{out}"
        survivors = ps.survivors()
        assert not survivors, [(p.pid, p.cmdline()) for p in survivors]
        outcomes.assert_clean()

        again = _foreman_set(tmp_path, env_file)
        sets.append(again)
        again.start()
        again.wait_ready()
        verdict = load.verdict(again, timeout=60)
        print(f"foreman {how}: stopped in {elapsed:.2f} s; requests {dict(outcomes.counts)};"
              f" long poll {outcomes.long_poll}; {verdict.accepted} jobs accepted,"
              f" {len(verdict.failed)} failed, {len(verdict.late)} late")
        verdict.assert_none_lost()
    finally:
        for each in sets:
            each.cleanup()


def _export(tmp_path: Path, fmt: str, env: dict[str, str]) -> list[Path]:
    outdir = tmp_path / fmt
    env_file = write_env(tmp_path / f"{fmt}.env", env)
    subprocess.run([foreman(), "export", fmt, str(outdir), "-f", str(ROOT / "Procfile"),
                    "-d", str(ROOT), "-a", "fm", "-u", getpass.getuser(), "-e", str(env_file),
                    "-l", str(tmp_path / "log")], check=True, capture_output=True, timeout=60)
    (tmp_path / "log").mkdir(exist_ok=True)
    return sorted(outdir.iterdir())


def test_foreman_export_supervisord_starts_every_entry(tmp_path: Path) -> None:
    port = free_port()
    files = _export(tmp_path, "supervisord", {"PORT": str(port), "VAR_DIR": str(tmp_path / "var")})
    assert [f.name for f in files] == ["fm.conf"]
    commands = re.findall(r"^command=(.*)$", files[0].read_text(), re.M)
    procfile = [line.split(":", 1)[1].strip() for line in (ROOT / "Procfile").read_text().splitlines()]
    assert commands == procfile  # as written: no `exec exec`, and no shell

    # supervisord started from the virtualenv (its programs are looked up on its own PATH)
    sv = Supervisord(tmp_path / "sv", files[0], env={**SERVICE_ENV, "PATH": f"{BIN}:/usr/bin:/bin"})
    try:
        sv.start()
        states = sv.wait_running()
        assert sorted(states) == ["fm:fm-beat-1", "fm:fm-broker-1", "fm:fm-web-1", "fm:fm-worker-1"]
        client = AppClient(port, tmp_path / "var")
        wait_ready(client)
        job = client.submit("echo", value="foreman export")
        assert client.wait_status(job, "succeeded")["result"] == "foreman export"
        assert "ready." in (tmp_path / "log" / "worker-1.log").read_text()
        sv.stop("shutdown")
        assert not sv.survivors(), [(p.pid, p.cmdline()) for p in sv.survivors()]
    finally:
        sv.cleanup()

    # the same config under a system supervisord (no virtualenv on its PATH): nothing starts
    sv = Supervisord(tmp_path / "sv-system", files[0])
    try:
        sv.start()
        deadline = time.monotonic() + 30
        while "can't find command 'gunicorn'" not in sv.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "can't find command 'gunicorn'" in sv.log_text(), sv.log_text()
    finally:
        sv.cleanup()


def test_foreman_export_systemd_login_shell(tmp_path: Path) -> None:
    """verify passes, but `bash -lc` resets PATH: from a virtualenv the program is not found."""
    files = _export(tmp_path, "systemd", {"PATH": f"{BIN}:/usr/bin:/bin"})  # even with PATH set
    result = verify(files)
    assert result.returncode == 0, result
    worker = parse_unit(next(f for f in files if f.name == "fm-worker.1.service"))
    assert worker["Service"]["KillMode"] == ["mixed"] and worker["Service"]["TimeoutStopSec"] == ["5"]
    argv, env, cwd = exec_start(worker)
    assert argv[:2] == ["/bin/bash", "-lc"] and argv[2].startswith('exec -a "fm-worker.1" celery '), argv
    run = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 127 and "celery: not found" in run.stderr, run
    assert shutil.which("celery", path=env["PATH"])  # the unit's PATH has it; the login shell dropped it
