"""systemd unit files, read and checked without a running systemd.

Interface (tests/e2e/test_deploy_systemd.py, test_deploy_foreman.py)::

    unit = parse_unit(path)            # {"Unit": {...}, "Service": {...}}, each key -> [values]
    verify(paths)                      # `systemd-analyze verify`: CompletedProcess (rc, stderr)
    argv, env, cwd = exec_start(unit)  # ExecStart as systemd would run it: argv (no shell added),
                                       # the environment it would get (its defaults + Environment=)

``systemd-analyze`` comes with Debian's ``systemd`` package (.ci/run
installs it); a missing one fails under CI (tests/servers.py ``missing``).
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from tests.servers import missing
from tools.stopcheck.managers import environment_file

# systemd's PATH for a service without Environment=PATH (systemd 252, Debian 12).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        missing("systemd-analyze is not installed (Debian package systemd)", "REQUIRE_SYSTEMD")
    return found


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(m.group(1), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on the files (it checks that ExecStart's program exists)."""
    return subprocess.run([systemd_analyze(), "verify", *map(str, paths)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


def _environment(values: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in values:
        for word in shlex.split(value.replace("%%", "%")):
            key, _, val = word.partition("=")
            env[key] = val
    return env


def exec_start(unit: dict[str, dict[str, list[str]]]) -> tuple[list[str], dict[str, str], str]:
    """ExecStart's argv, and the environment and directory systemd would give it.

    systemd sets PATH (its default), HOME, USER, LOGNAME and SHELL for User=,
    then Environment=, then EnvironmentFile=; it runs the program itself (no shell). Specifiers and
    $VAR expansion are not emulated: the units tested here use neither in
    ExecStart (``%%`` is unescaped).
    """
    service = unit["Service"]
    user = pwd.getpwnam(service.get("User", ["root"])[-1])
    env = {"PATH": SYSTEMD_PATH, "HOME": user.pw_dir, "USER": user.pw_name,
           "LOGNAME": user.pw_name, "SHELL": user.pw_shell, "LANG": "C.UTF-8",
           **_environment(service.get("Environment", []))}
    for path in service.get("EnvironmentFile", []):  # read as root by systemd; it wins
        env.update(environment_file(path))
    argv = shlex.split(service["ExecStart"][-1].replace("%%", "%"))
    return argv, env, service.get("WorkingDirectory", ["/"])[-1]
