"""The set under a real supervisord, from `scripts/export supervisord` (deploy/honcho/).

Each test runs its own supervisord (own socket, log and var/), with a
minimal environment (no virtualenv on PATH), starts a busy set (long jobs
past the grace, a long poll, a request stream: tests/workload.py), stops it
with one of supervisord's three stop paths and restarts it:

- ``supervisorctl stop all``: signals every program at once (broker too);
  the broker launcher's linger keeps redis-server up for the worker;
- ``supervisorctl shutdown`` and SIGTERM to supervisord: one group at a time,
  highest priority first, so the broker group (priority 100) stops last.

Then: no request reset, cut short or answered 5xx; every accepted job
succeeds after the restart (none lost, failed or late); supervisord logged no
SIGKILL and every program exited 0; no process left running.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.procset import ROOT, AppClient, free_port
from tests.supervised import Supervisord, export, write_env
from tests.workload import Workload, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

PROGRAMS = ("web-1", "worker-1", "beat-1", "broker-1")
JOB_SECONDS = 8  # longer than the grace (3 s): every running job is handed back


def _export(tmp_path: Path, grace: float = 3, drain: float = 0) -> tuple[Path, AppClient]:
    port = free_port()
    env_file = write_env(tmp_path / "app.env", {
        "PORT": str(port), "VAR_DIR": str(tmp_path / "var"), "SHUTDOWN_GRACE_SECONDS": str(grace),
        "SHUTDOWN_DRAIN_SECONDS": str(drain), "WORKER_CONCURRENCY": "6", "PYTHONUNBUFFERED": "1"})
    files = export("supervisord", tmp_path / "export", env_file, log_dir=tmp_path / "log")
    assert [f.name for f in files] == ["flaskset.conf"]
    return files[0], AppClient(port, tmp_path / "var")


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, AppClient]:
    return _export(tmp_path)


def test_exported_config(exported: tuple[Path, AppClient]) -> None:
    """SIGTERM, a stop timeout above drain + grace + 2 s, group kill, broker in a lower-priority group."""
    text = exported[0].read_text()
    programs = dict(re.findall(r"^\[program:([\w-]+)\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S))
    assert sorted(programs) == sorted(PROGRAMS)
    for name, body in programs.items():
        settings = dict(line.split("=", 1) for line in body.strip().splitlines())
        assert settings["stopsignal"] == "TERM", name
        assert int(settings["stopwaitsecs"]) >= 3 + 2 + 5, name
        assert settings["stopasgroup"] == settings["killasgroup"] == "true", name
        assert settings["command"].startswith("/"), name  # no shell, no PATH lookup
        assert "PATH=" + str(Path(__import__("sys").prefix) / "bin") in settings["environment"], name
        assert int(settings["startretries"]) > 0 and int(settings["startsecs"]) > 0, name
        assert "HONCHO_PROCESS_NAME" not in settings["environment"], name  # not honcho's 5 s window
    assert exported[0].stat().st_mode & 0o777 == 0o600  # its environment= holds the app's secrets
    assert re.search(r"^\[group:flaskset-broker\]\nprograms=broker-1\npriority=100$", text, re.M)
    assert re.search(r"^\[group:flaskset\]\nprograms=web-1,worker-1,beat-1\npriority=200$", text, re.M)


@pytest.mark.parametrize(("how", "grace", "drain"), [
    ("stop all", 3, 0),
    ("shutdown", 3, 2),  # the web serves on for 2 s (/readyz 503) before its stop
    ("sigterm", 6, 0),  # a grace past honcho's 5 s window: not cut, stopwaitsecs covers it
])
def test_busy_stop_and_restart(tmp_path: Path, how: str, grace: float, drain: float) -> None:
    include, client = _export(tmp_path, grace, drain)
    sv = Supervisord(tmp_path / "supervisord", include)
    try:
        sv.start()
        sv.wait_running()
        wait_ready(client)
        load = Workload(client, jobs=6, job_seconds=JOB_SECONDS)
        load.start()
        elapsed = sv.stop(how)
        outcomes = load.finish()
        assert not sv.survivors(supervisord_too=how != "stop all"), (
            [(p.pid, p.cmdline()) for p in sv.survivors()])
        log = sv.log_text()
        assert not sv.kills(), log
        worker = (tmp_path / "log" / "worker-1.log").read_text()
        assert f"graceful shutdown started (grace {grace:.1f} s for 6 running task(s))" in worker, worker
        for name in PROGRAMS:
            assert f"stopped: {name} (exit status 0)" in log, f"{name}:\n{log}"
        if how != "stop all":  # one group at a time: the broker only once the others are gone
            stops = [m.group(1) for m in re.finditer(r"stopped: ([\w-]+) ", log)]
            assert stops.index("broker-1") == len(stops) - 1, stops
        else:  # all at once: the launcher kept redis-server up until its clients had gone
            broker = (tmp_path / "log" / "broker-1.log").read_text()
            assert re.search(r"waiting up to [\d.]+ s for \d+ client\(s\) to disconnect", broker), broker
            assert "still connected after" not in broker, broker
        outcomes.assert_clean()

        if how == "stop all":
            assert sv.ctl("start", "all").returncode == 0
        else:
            sv = Supervisord(tmp_path / "supervisord", include)
            sv.start()
        sv.wait_running()
        wait_ready(client)
        verdict = load.verdict(client, timeout=60)
        print(f"supervisord {how}: stopped in {elapsed:.2f} s; requests {dict(outcomes.counts)};"
              f" long poll {outcomes.long_poll}; {verdict.accepted} jobs accepted,"
              f" {len(verdict.succeeded)} succeeded, {len(verdict.failed)} failed, {len(verdict.late)} late")
        verdict.assert_none_lost()
        assert verdict.accepted > len(load.long_ids)
    finally:
        sv.cleanup()


def test_stock_honcho_export_leaves_nothing_running_and_loses_nothing(tmp_path: Path) -> None:
    """`honcho export supervisord` as it is, the trap users fall into: `sh -c '<line>'` per
    program and `stopsignal=QUIT` to that shell alone. The shell dies; each program follows
    its shell's death (PR_SET_PDEATHSIG, stopright/signals.py) with its graceful stop, instead of
    running on unseen by supervisord."""
    import getpass
    import subprocess
    import sys

    from tests.supervised import BIN

    port = free_port()
    env_file = write_env(tmp_path / "app.env", {
        "PORT": str(port), "VAR_DIR": str(tmp_path / "var"), "WORKER_CONCURRENCY": "6",
        "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}:/usr/bin:/bin"})
    (tmp_path / "log").mkdir()
    subprocess.run([sys.executable, "-m", "honcho", "export", "-f", "Procfile", "-e", str(env_file),
                    "-a", "stock", "-u", getpass.getuser(), "-l", str(tmp_path / "log"),
                    "supervisord", str(tmp_path / "export")],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    include = tmp_path / "export" / "stock.conf"
    assert "stopsignal=QUIT" in include.read_text()
    client = AppClient(port, tmp_path / "var")
    sv = Supervisord(tmp_path / "supervisord", include)
    try:
        sv.start()
        sv.wait_running()
        wait_ready(client)
        load = Workload(client, jobs=6, job_seconds=JOB_SECONDS)
        load.start()
        sv.stop("stop all")  # returns once every process seen is gone: none runs on
        outcomes = load.finish()
        assert not sv.survivors(supervisord_too=False), [(p.pid, p.cmdline()) for p in sv.survivors()]
        # Their logs are lost (supervisord stops reading once the shell is gone): the ledger
        # says what they did. Every long job was handed back, none left `running`.
        stored = client.stored_jobs()
        assert [(stored[j]["status"], stored[j]["attempts"]) for j in load.long_ids] == [("queued", 0)] * 6
        outcomes.assert_clean()
        assert sv.ctl("start", "all").returncode == 0
        sv.wait_running()
        wait_ready(client)
        load.verdict(client, timeout=60).assert_none_lost()
    finally:
        sv.cleanup()
