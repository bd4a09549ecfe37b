"""What a manager's stop is made of: units (what runs, how it is stopped) and the plan of them all.

The data every part of stopcheck shares (tools.stopcheck.managers makes plans,
tools.stopcheck.supervisord the real supervisord's, tools.stopcheck.engine runs them),
so none of them imports another to get it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.stopcheck.policy import Policy

DEFAULT_TIMEOUT = {"docker": 10.0, "kubernetes": 30.0, "heroku": 30.0, "systemd": 90.0, "supervisord": 10.0,
                   "foreman": 5.0}
SHELL_CHARS = re.compile(r"[$`|&;<>(){}*?~\\\n]|^\s*\w+=")  # needs a shell: expansion, pipes, assignments


@dataclass(frozen=True)
class Unit:
    name: str
    argv: tuple[str, ...]
    policy: Policy
    entry: str  # the Procfile entry it runs; "*" when one program runs them all (honcho, foreman)
    pid1: bool = False  # PID 1 of a new PID namespace (a container)
    env: Mapping[str, str] = field(default_factory=dict)  # added to the report's environment
    clean_env: bool = False  # systemd: Environment= only (and systemd's PATH), not the caller's
    real_manager: bool = False  # a real manager runs inside: its SIGKILL at --timeout is the report's
    cwd: str | None = None  # default: the Procfile's directory


@dataclass(frozen=True)
class Plan:
    manager: str
    units: tuple[Unit, ...]
    summary: str  # what the manager sends to whom and when, in one sentence
    notes: tuple[str, ...] = ()


@dataclass
class Options:
    timeout: float | None = None  # the manager's own: docker -t, terminationGracePeriodSeconds, ...
    pre_stop: float = 0.0  # kubernetes preStop sleep
    kill_mode: str = "control-group"  # systemd, for units made from the Procfile
    pid1: str = "entry"  # docker: "entry" (each entry PID 1) or "honcho" (honcho start PID 1)
    units_dir: Path | None = None  # systemd: the unit files to simulate (else one per entry)
    config: Path | None = None  # supervisord: your configuration file (else one from the Procfile)
    signal: str = "TERM"  # foreman, supervisord: TERM to the manager (a platform) or INT (a terminal's ^C)
    report_timeout: float = 60.0  # real managers: SIGKILL by the report after this


def command_argv(command: str) -> tuple[tuple[str, ...], bool]:
    """A Procfile command as a container runs it: exec form when it needs no shell, else shell form.

    Returns (argv, shell). Exec form is ``shlex.split``; shell form is what
    Docker does with a string CMD: ``/bin/sh -c COMMAND``, the shell as PID 1.
    """
    if SHELL_CHARS.search(command):
        return ("/bin/sh", "-c", command), True
    return tuple(shlex.split(command)), False
