"""Run an exported configuration under a real supervisord, in a temporary directory.

Interface (tests/e2e/test_deploy_supervisord.py, tools/bench/deploy_stops.py)::

    files = export("supervisord", outdir, env_file)      # scripts/export, this venv
    sv = Supervisord(workdir, include=files[0])           # own socket, log, pid file
    sv.start(); sv.wait_running(timeout=60)
    elapsed = sv.stop("stop all" | "shutdown" | "sigterm")   # until every process is gone
    sv.kills()        # supervisord log lines that say it had to SIGKILL
    sv.survivors()    # processes seen under supervisord (redis-server too) still alive
    sv.cleanup()      # kill by pid whatever is left

supervisord runs with a minimal environment (PATH=/usr/bin:/bin, no
virtualenv), as a system service would: the exported programs must find
their virtualenv themselves. Its log is ``workdir/supervisord.log``; the
programs' logs go where the export put them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.procset import ROOT, ProcessTree

VENV = Path(sys.prefix)
BIN = Path(sys.executable).parent
SERVICE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}


def export(fmt: str, outdir: Path, env_file: Path, app: str = "flaskset",
           extra: tuple[str, ...] = (), log_dir: Path | None = None) -> list[Path]:
    """``scripts/export FMT OUTDIR`` against this virtualenv; the files it wrote."""
    args = [str(ROOT / "scripts" / "export"), fmt, str(outdir), "-a", app]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        args += ["-l", str(log_dir)]
    env = {**os.environ, "VENV": str(VENV), "ENV_FILE": str(env_file)}
    subprocess.run([*args, *extra], env=env, check=True, capture_output=True, text=True, timeout=300)
    return sorted(outdir.iterdir())


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


class Supervisord(ProcessTree):
    def __init__(self, workdir: Path, include: Path, *, binary_dir: Path = BIN,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = env or SERVICE_ENV  # supervisord's own environment (its programs inherit it)
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "supervisord.conf"
        self.log = workdir / "supervisord.log"
        self.socket = workdir / "supervisor.sock"
        self.binary_dir = binary_dir
        (workdir / "childlogs").mkdir(exist_ok=True)
        self.conf.write_text(f"""\
[unix_http_server]
file={self.socket}
chmod=0700

[supervisord]
logfile={self.log}
pidfile={workdir / "supervisord.pid"}
childlogdir={workdir / "childlogs"}
nodaemon=true
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{self.socket}

[include]
files={include}
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, psutil.Process] = {}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(self.binary_dir / "supervisord"), "-c", str(self.conf)], cwd=self.workdir,
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary_dir / "supervisorctl"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout, env=SERVICE_ENV)

    def status(self) -> dict[str, str]:
        """Program (group:name) to state, from ``supervisorctl status``."""
        out = self.ctl("status").stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if len(line.split()) > 1}

    def wait_running(self, timeout: float = 60) -> dict[str, str]:
        """Every program RUNNING (supervisord's startsecs passed); snapshot the tree."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()
            states = self.status()
            if states and all(s == "RUNNING" for s in states.values()):
                self.snapshot()
                return states
            time.sleep(0.2)
        raise AssertionError(f"not all RUNNING within {timeout} s: {states}\n{self.log_text()}")

    def survivors(self, *, supervisord_too: bool = True) -> list[psutil.Process]:
        spared = None if supervisord_too or self.proc is None else self.proc.pid
        return ProcessTree.survivors(self, but=spared)

    def stop(self, how: str, timeout: float = 120) -> float:
        """Stop every program with ``how``; seconds until the last process seen is gone."""
        assert self.proc is not None
        self.snapshot()
        started = time.monotonic()
        if how == "stop all":
            result = self.ctl("stop", "all", timeout=timeout)
            assert result.returncode == 0, result
        elif how == "shutdown":
            result = self.ctl("shutdown", timeout=timeout)
            assert result.returncode == 0, result
            self.proc.wait(timeout)
        elif how == "sigterm":
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        else:
            raise ValueError(how)
        deadline = time.monotonic() + timeout
        while self.survivors(supervisord_too=how != "stop all") and time.monotonic() < deadline:
            time.sleep(0.02)
        return time.monotonic() - started

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kills(self) -> list[str]:
        """supervisord's own lines saying a program had to be SIGKILLed."""
        return [line for line in self.log_text().splitlines() if "SIGKILL" in line]
