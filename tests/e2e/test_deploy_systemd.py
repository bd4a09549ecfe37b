"""The systemd units of `scripts/export systemd` (deploy/honcho/), and honcho's stock ones.

No systemd runs here (no PID 1 systemd in a test): the units are checked by
``systemd-analyze verify`` (which also checks that each ExecStart program
exists: the export is made against this virtualenv), by their settings, and
by running each unit's ExecStart the way systemd would (its environment, its
directory, no shell), then stopping the set in the order systemd derives from
After= (the broker last), SIGTERM to each main process as KillMode=mixed does.
"""

from __future__ import annotations

import getpass
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.procset import ROOT, AppClient, free_port
from tests.supervised import BIN, export, write_env
from tests.units import exec_start, parse_unit, verify
from tests.workload import wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ENTRIES = ("web", "worker", "beat", "broker")


def test_units_verify_and_settings(tmp_path: Path) -> None:
    """verify passes; SIGTERM to the main process, TimeoutStopSec from drain + grace, broker last."""
    env_file = write_env(tmp_path / "app.env", {"SHUTDOWN_GRACE_SECONDS": "10",
                                                "SHUTDOWN_DRAIN_SECONDS": "4.5"})
    units = {p.name: p for p in export("systemd", tmp_path / "units", env_file, app="flaskset")}
    assert sorted(units) == sorted(
        ["flaskset.env", "flaskset.target", *(f"flaskset-{e}.target" for e in ENTRIES),
         *(f"flaskset-{e}-1.service" for e in ENTRIES)])
    result = verify([p for p in units.values() if p.suffix != ".env"])
    assert result.returncode == 0 and not result.stderr.strip(), result

    for entry in ENTRIES:
        unit = parse_unit(units[f"flaskset-{entry}-1.service"])
        service = unit["Service"]
        assert service["KillMode"] == ["mixed"] and service["KillSignal"] == ["SIGTERM"], entry
        assert service["TimeoutStopSec"] == [str(10 + 5 + 2 + 5)], entry  # ceil(4.5) + 10 + 2 + 5
        assert service["Restart"] == ["on-failure"] and float(service["RestartSec"][0]) > 0, entry
        assert int(unit["Unit"]["StartLimitBurst"][0]) > 0, entry
        argv, env, cwd = exec_start(unit)
        assert argv[0].startswith(str(BIN)), (entry, argv)  # the virtualenv's program, no shell
        assert env["PATH"].startswith(str(BIN) + ":"), entry
        assert cwd == str(ROOT)
        ordering = (unit["Unit"].get("After", []), unit["Unit"].get("Wants", []))
        expected = ([], []) if entry == "broker" else (["flaskset-broker-1.service"],) * 2
        assert ordering == expected, entry


#: A setting with a password and every character systemd's parsers treat specially.
SECRET_URL = "postgresql+psycopg://app:pa$$w'o\"rd%40@127.0.0.1:5432/app"


def test_secrets_stay_out_of_unit_files(tmp_path: Path) -> None:
    """Unit files are world-readable (``systemctl show`` prints Environment= to any user): the
    settings go to an EnvironmentFile only root reads, and reach the program unchanged."""
    env_file = tmp_path / "app.env"
    env_file.write_text("DATABASE_URL=" + shlex.quote(SECRET_URL) + "\nSHUTDOWN_GRACE_SECONDS=4\n")
    out = tmp_path / "units"
    units = {p.name: p for p in export("systemd", out, env_file, app="flaskset")}

    private = out / "flaskset.env"
    assert private.stat().st_mode & 0o777 == 0o600
    for name, path in units.items():
        if name.endswith(".service"):
            text = path.read_text()
            assert "pa$$w" not in text and "DATABASE_URL" not in text, name
            unit = parse_unit(path)
            assert unit["Service"]["EnvironmentFile"] == [str(private)], name
            assert unit["Service"]["TimeoutStopSec"] == [str(4 + 2 + 5)], name  # the budget, inline
            _argv, env, _cwd = exec_start(unit)
            assert env["DATABASE_URL"] == SECRET_URL, name
            assert env["PATH"].startswith(str(BIN) + ":"), name
    assert verify([p for p in units.values() if p.suffix != ".env"]).returncode == 0


def test_verify_checks_the_program(tmp_path: Path) -> None:
    """The check above can fail: a unit whose program is not in the virtualenv does not verify."""
    written = export("systemd", tmp_path / "units", write_env(tmp_path / "app.env", {}))
    units = [p for p in written if p.suffix != ".env"]
    worker = next(p for p in units if p.name.endswith("-worker-1.service"))
    worker.write_text(worker.read_text().replace(f"ExecStart={BIN}/celery", f"ExecStart={BIN}/no-celery"))
    result = verify(units)
    assert result.returncode != 0 and "no-celery" in result.stderr, result


def test_exec_start_runs_the_set_without_a_shell(tmp_path: Path) -> None:
    """Each unit's ExecStart, as systemd runs it, starts its entry; stopped in systemd's order, all exit 0."""
    port = free_port()
    env_file = write_env(tmp_path / "app.env", {"PORT": str(port), "VAR_DIR": str(tmp_path / "var"),
                                                "PYTHONUNBUFFERED": "1"})
    units = {p.name: p for p in export("systemd", tmp_path / "units", env_file, app="flaskset")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    seen: dict[int, psutil.Process] = {}
    try:
        for entry in ("broker", "web", "worker", "beat"):  # After=: the broker first
            argv, env, cwd = exec_start(parse_unit(units[f"flaskset-{entry}-1.service"]))
            with (tmp_path / f"{entry}.log").open("wb") as log:
                procs[entry] = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=log,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        client = AppClient(port, tmp_path / "var")
        wait_ready(client)
        job = client.submit("echo", value="systemd")
        assert client.wait_status(job, "succeeded")["result"] == "systemd"
        _wait_for_text(tmp_path / "beat.log", "beat: Starting")
        for p in procs.values():
            root = psutil.Process(p.pid)
            for each in [root, *root.children(recursive=True)]:
                seen[each.pid] = each
        # systemd stops the units that are After= the broker first, then the broker.
        for entry in ("web", "worker", "beat"):
            procs[entry].send_signal(signal.SIGTERM)
        for entry in ("web", "worker", "beat"):
            assert procs[entry].wait(22) == 0, (tmp_path / f"{entry}.log").read_text()
        procs["broker"].send_signal(signal.SIGTERM)
        assert procs["broker"].wait(22) == 0, (tmp_path / "broker.log").read_text()
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in seen.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p.pid for p in seen.values() if _alive(p)]
        assert not left, left
    finally:
        for p in [*seen.values()]:
            if _alive(p):
                p.kill()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(5)


def _wait_for_text(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in {path}:\n{path.read_text()}"
        time.sleep(0.05)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stock_honcho_units_cannot_start_from_a_virtualenv(tmp_path: Path) -> None:
    """`honcho export systemd` as is: verify passes, yet `sh -lc` resets PATH: the program is not found."""
    env_file = write_env(tmp_path / "app.env", {"PATH": f"{BIN}:/usr/bin:/bin"})  # even with PATH set
    outdir = tmp_path / "stock"
    subprocess.run([sys.executable, "-m", "honcho", "export", "-f", str(ROOT / "Procfile"),
                    "-d", str(ROOT), "-e", str(env_file), "-a", "stock", "-u", getpass.getuser(),
                    "systemd", str(outdir)],
                   check=True, capture_output=True, timeout=60)
    units = sorted(outdir.iterdir())
    assert verify(units).returncode == 0  # verify cannot see it: /bin/sh exists
    worker = parse_unit(outdir / "stock-worker-1.service")
    assert worker["Service"]["KillMode"] == ["process"] and "TimeoutStopSec" not in worker["Service"]
    argv, env, cwd = exec_start(worker)
    assert argv[:2] == ["/bin/sh", "-lc"], argv
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 127 and "celery: not found" in result.stderr, result
    assert shutil.which("celery", path=env["PATH"])  # found without the login shell
