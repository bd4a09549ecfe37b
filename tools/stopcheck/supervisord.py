"""The real supervisord running a Procfile's set: its configuration, and how the report stops it.

supervisord (``-n``, in the foreground) gets SIGTERM, as systemd or a
container runtime would stop it. It then stops its groups one at a time,
highest priority first (``ordered_stop_groups_phase_1``), each program with
its ``stopsignal`` (to the program, or its process group with
``stopasgroup``), and SIGKILLs a program still running after ``stopwaitsecs``
(to its group with ``killasgroup``). Without ``--config`` the programs get
supervisord's defaults (TERM, 10 s, only the program's own process); with it,
your ``[program:x]`` sections are included as they are (e.g. the file
``scripts/export supervisord DIR`` writes).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path

from tools.stopcheck.plans import DEFAULT_TIMEOUT, Options, Plan, Unit, command_argv
from tools.stopcheck.policy import GROUP, MAIN, TREE, Policy


def config_text(directory: Path, entries: Sequence[tuple[str, str]], workdir: Path, *,
                stopwaitsecs: float, include: Path | None = None) -> str:
    """A supervisord.conf: the daemon's own files in ``workdir``, every program's output on its stdout."""
    lines = [
        "[supervisord]",
        "nodaemon=true",
        f"logfile={workdir / 'supervisord.log'}",
        f"pidfile={workdir / 'supervisord.pid'}",
        f"childlogdir={workdir}",
        "",
    ]
    if include is not None:
        lines += ["[include]", f"files={include.resolve()}", ""]
        return "\n".join(lines)
    for name, cmd in entries:
        argv, _shell = command_argv(cmd)
        command = " ".join(_quote(a) for a in argv)
        lines += [
            f"[program:{name}]",
            f"command={command.replace('%', '%%')}",
            f"directory={directory}",
            "autorestart=false",
            "startsecs=0",
            f"stopwaitsecs={stopwaitsecs:g}",
            "stdout_logfile=/dev/fd/1",
            "stdout_logfile_maxbytes=0",
            "redirect_stderr=true",
            "",
        ]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    """supervisord splits ``command`` with shlex: quote what needs it."""
    if arg and all(c.isalnum() or c in "-_./:=,@+" for c in arg):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def real_plan(program: list[str], directory: Path, entries: Sequence[tuple[str, str]], opts: Options,
              workdir: Path) -> Plan:
    wait = opts.timeout if opts.timeout is not None else DEFAULT_TIMEOUT["supervisord"]
    conf = workdir / "supervisord.conf"
    conf.write_text(config_text(directory, entries, workdir, stopwaitsecs=wait, include=opts.config))
    argv = (*program, "-n", "-c", str(conf))
    stop = signal.SIGINT if opts.signal == "INT" else signal.SIGTERM
    to = GROUP if opts.signal == "INT" else MAIN
    unit = Unit("supervisord", argv, Policy(stop_signal=stop, signal_to=to, timeout=opts.report_timeout,
                                            kill_to=TREE), "*", real_manager=True)
    source = f"your {opts.config}" if opts.config else f"supervisord's defaults (stopwaitsecs={wait:g})"
    return Plan("supervisord", (unit,), f"SIGTERM to supervisord, which stops one group at a time with each "
                f"program's stopsignal and SIGKILLs after stopwaitsecs ({source})")
