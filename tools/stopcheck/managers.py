"""Each manager's way of stopping a Procfile's set, as units and policies (pure; unit-tested).

- docker: each entry (or ``honcho start``) is PID 1 of its own PID namespace;
  ``docker stop`` sends STOPSIGNAL (SIGTERM) to PID 1 only, SIGKILL after
  ``-t`` (10 s). When PID 1 exits the kernel kills the rest of the namespace.
  A shell-form command (``$VAR``, pipes) runs as ``/bin/sh -c`` PID 1: dash
  has no handler, and the kernel drops a handler-less SIGTERM to PID 1.
- kubernetes: each entry its own container (PID 1), an optional preStop sleep
  first, then SIGTERM to PID 1, SIGKILL ``terminationGracePeriodSeconds``
  (30) after the start of the stop, preStop included. The Service keeps
  routing new connections for a few seconds after that (see tools.stopcheck.traffic).
- heroku: each entry alone in its dyno (``bash -c``); SIGTERM to every process
  of the dyno at once, SIGKILL to whatever is left 30 s later.
- systemd: one service per entry (or the unit files you give). KillMode
  control-group (default): KillSignal to every process of the unit, then, when
  the main process exits, to the rest again; SIGKILL after TimeoutStopSec
  (90). mixed: KillSignal to the main process only; when it exits, SIGKILL to
  the rest at once; at the timeout SIGKILL to all. process: the main process
  only; the rest are left running. A unit stops after every unit ordered
  ``After=`` it has stopped (stop order is the reverse of start order).
- supervisord (simulated when it is not installed): each program in its own
  process group; ``stopsignal`` (TERM) to the program, or to its group with
  ``stopasgroup``; SIGKILL after ``stopwaitsecs`` (10).
- honcho, foreman, supervisord (installed): the real program runs the whole
  set; the report stops it as a platform or a terminal would and only kills
  what outlives ``--timeout``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tools.stopcheck.plans import DEFAULT_TIMEOUT, Options, Plan, Unit, command_argv
from tools.stopcheck.policy import DONE, GROUP, KILL_REST, MAIN, TERM_REST, TREE, WAIT, Policy
from tools.stopcheck.supervisord import real_plan

MANAGERS = ("honcho", "foreman", "supervisord", "systemd", "docker", "kubernetes", "heroku")
KILL_MODES = ("control-group", "mixed", "process")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's default PATH


def _timeout(manager: str, opts: Options) -> float:
    return opts.timeout if opts.timeout is not None else DEFAULT_TIMEOUT[manager]


def _stop_signal(opts: Options) -> int:
    return signal.SIGINT if opts.signal == "INT" else signal.SIGTERM


def plan(manager: str, directory: Path, entries: Sequence[tuple[str, str]], opts: Options,
         workdir: Path | None = None) -> Plan:
    """The units ``manager`` would run for this Procfile and how it stops each.

    ``workdir``: where a real manager's generated configuration goes (supervisord).
    """
    if manager not in MANAGERS or manager == "honcho":
        raise ValueError(f"no simulation for {manager!r} (honcho is the report's default run)")
    t = _timeout(manager, opts)
    if manager == "docker":
        if opts.pid1 == "honcho":
            argv = (sys.executable, "-m", "honcho", "start", "--no-colour", "-f",
                    str(directory / "Procfile"), "-d", str(directory))
            unit = Unit("honcho", argv, Policy(signal_to=MAIN, timeout=t, kill_to=TREE), "*", pid1=True)
            return Plan(manager, (unit,), f"SIGTERM to PID 1 (honcho start) of one container; SIGKILL to "
                        f"the container {t:g} s later")
        return _containers(manager, entries, Policy(signal_to=MAIN, timeout=t, kill_to=TREE),
                           f"SIGTERM to PID 1 of each entry's container at once; SIGKILL to each "
                           f"container still running {t:g} s later")
    if manager == "kubernetes":
        pre = f"a preStop sleep of {opts.pre_stop:g} s, then " if opts.pre_stop else ""
        return _containers(manager, entries,
                           Policy(signal_to=MAIN, timeout=t, kill_to=TREE, pre_stop=opts.pre_stop),
                           f"every pod at once: {pre}SIGTERM to PID 1 of each container; SIGKILL "
                           f"{t:g} s after the start of the stop (terminationGracePeriodSeconds)")
    if manager == "heroku":
        policy = Policy(signal_to=TREE, timeout=t, kill_to=TREE, on_main_exit=WAIT)
        units = tuple(Unit(name, ("/bin/bash", "-c", cmd), policy, name, env={"DYNO": f"{name}.1"})
                      for name, cmd in entries)  # Heroku sets DYNO; stopright/budget.py reads it
        return Plan(manager, units, f"each entry in its own dyno (bash -c); SIGTERM to every process of "
                    f"every dyno at once; SIGKILL to what is left {t:g} s later")
    if manager == "systemd":
        if opts.units_dir is not None:
            return systemd_plan_from_files(opts.units_dir, opts)
        policy = systemd_policy(opts.kill_mode, signal.SIGTERM, t)
        units = tuple(Unit(name, command_argv(cmd)[0], policy, name) for name, cmd in entries)
        return Plan(manager, units, f"one service per entry, stopped at once (no After= ordering): "
                    f"{systemd_summary(opts.kill_mode, t)}")
    if manager == "supervisord":
        program = supervisord_program()
        if program is None or workdir is None:
            return supervisord_simulated(entries, opts)
        return real_plan(program, directory, entries, opts, workdir)
    # foreman
    argv = ("foreman", "start", "-f", str(directory / "Procfile"), "-d", str(directory), "-t", f"{t:g}")
    how = ("SIGINT to foreman's process group (a terminal's ^C; its children share it)"
           if opts.signal == "INT" else "SIGTERM to foreman (a platform)")
    to = GROUP if opts.signal == "INT" else MAIN
    unit = Unit("foreman", argv, Policy(stop_signal=_stop_signal(opts), signal_to=to,
                                        timeout=opts.report_timeout, kill_to=TREE), "*", real_manager=True)
    return Plan(manager, (unit,), f"{how}; foreman SIGTERMs its children and SIGKILLs them after "
                f"-t {t:g} s")


def _containers(manager: str, entries: Sequence[tuple[str, str]], policy: Policy, summary: str) -> Plan:
    units, notes = [], []
    for name, cmd in entries:
        argv, shell = command_argv(cmd)
        if shell:
            notes.append(f"{name}: shell form (/bin/sh -c as PID 1): the command needs a shell")
        units.append(Unit(name, argv, policy, name, pid1=True))
    return Plan(manager, tuple(units), summary, tuple(notes))


def systemd_policy(kill_mode: str, kill_signal: int, timeout: float, after: tuple[str, ...] = ()) -> Policy:
    """systemd's stop of one service (src/core/service.c, unit_kill_context())."""
    if kill_mode == "control-group":
        return Policy(kill_signal, TREE, timeout, TREE, on_main_exit=TERM_REST, after=after)
    if kill_mode == "mixed":
        return Policy(kill_signal, MAIN, timeout, TREE, on_main_exit=KILL_REST, after=after)
    if kill_mode == "process":
        return Policy(kill_signal, MAIN, timeout, MAIN, on_main_exit=DONE, after=after)
    raise ValueError(f"KillMode={kill_mode} not simulated (one of {', '.join(KILL_MODES)})")


def systemd_summary(kill_mode: str, timeout: float) -> str:
    return {
        "control-group": "KillSignal to every process of the unit, again to those left when the main "
                         f"process exits; SIGKILL after TimeoutStopSec={timeout:g}",
        "mixed": "KillSignal to the main process; SIGKILL to the rest when it exits, or to all after "
                 f"TimeoutStopSec={timeout:g}",
        "process": f"KillSignal to the main process only, SIGKILL to it after TimeoutStopSec={timeout:g}; "
                   "the rest are left running",
    }[kill_mode]


def parse_unit(text: str) -> dict[str, list[str]]:
    """A systemd unit file as {"Section.Key": [values...]} (comments, continuation lines handled)."""
    out: dict[str, list[str]] = {}
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def unit_environment(values: Sequence[str]) -> dict[str, str]:
    """``Environment=`` lines (each holding one or more quoted ``K=V`` words) as a dict."""
    env: dict[str, str] = {}
    for value in values:
        for word in shlex.split(value):
            key, sep, val = word.partition("=")
            if sep:
                env[key] = val.replace("%%", "%")
    return env


def environment_file(path: str) -> dict[str, str]:
    """An ``EnvironmentFile=`` as systemd reads it (a leading ``-``: optional): ``K=V`` lines,
    ``#``/``;`` comments, single quotes literal, double quotes with backslash escapes."""
    optional = path.startswith("-")
    try:
        text = Path(path.lstrip("-")).read_text()
    except FileNotFoundError:
        if optional:
            return {}
        raise
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        env[key.strip()] = value
    return env


def service_environment(unit: Mapping[str, Sequence[str]], base: Mapping[str, str]) -> dict[str, str]:
    """``base``, then ``Environment=``, then each ``EnvironmentFile=`` (which wins, as in systemd)."""
    env = {**base, **unit_environment(unit.get("Service.Environment", []))}
    for path in unit.get("Service.EnvironmentFile", []):
        env.update(environment_file(path))
    return env


def expand_exec(value: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """ExecStart= as systemd runs it: no shell; ``${VAR}`` is one word, ``$VAR`` splits; ``%%`` is %."""
    line = value.lstrip("-@:+!").replace("%%", "%")
    argv: list[str] = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv.extend(env.get(whole[1], "").split())
            continue
        argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word))
    return tuple(argv)


def unit_entry(name: str, env: Mapping[str, str], description: str) -> str:
    """The Procfile entry a unit runs: HONCHO_PROCESS_NAME, else honcho export's "APP web.1"
    description, else the unit's name."""
    process = env.get("HONCHO_PROCESS_NAME") or (description.split()[-1] if description.strip() else "")
    if re.fullmatch(r"[A-Za-z0-9_-]+\.\d+", process):
        return process.rsplit(".", 1)[0]
    return name


def systemd_plan_from_files(units_dir: Path, opts: Options) -> Plan:
    """Units from ``*.service`` files (e.g. ``scripts/export systemd DIR``), their own settings."""
    files = sorted(units_dir.glob("*.service"))
    if not files:
        raise ValueError(f"no *.service files in {units_dir}")
    parsed = {f.stem: parse_unit(f.read_text()) for f in files}
    before: dict[str, list[str]] = {name: [] for name in parsed}  # stopped before it (they are After= it)
    for name, unit in parsed.items():
        for value in unit.get("Unit.After", []):
            for dep in value.split():
                dep_name = dep.removesuffix(".service")
                if dep_name in before:
                    before[dep_name].append(name)
    units = []
    modes = set()
    for name, unit in parsed.items():
        env = service_environment(unit, {"PATH": DEFAULT_PATH})
        argv = expand_exec(unit["Service.ExecStart"][-1], env)
        mode = unit.get("Service.KillMode", ["control-group"])[-1]
        modes.add(mode)
        sig = signal.Signals[unit.get("Service.KillSignal", ["SIGTERM"])[-1]]
        timeout = float(unit.get("Service.TimeoutStopSec", [str(DEFAULT_TIMEOUT["systemd"])])[-1]
                        .removesuffix("s"))
        entry = unit_entry(name, env, unit.get("Unit.Description", [""])[-1])
        cwd = unit.get("Service.WorkingDirectory", [""])[-1].lstrip("-") or None
        units.append(Unit(name, argv, systemd_policy(mode, sig, timeout, tuple(sorted(before[name]))), entry,
                          env=env, clean_env=True, cwd=cwd))
    ordered = [u.name for u in units if u.policy.after]
    summary = (f"the unit files in {units_dir}: KillMode={'/'.join(sorted(modes))}; "
               + (f"{', '.join(ordered)} stopped once the units ordered After= them have stopped"
                  if ordered else "all stopped at once"))
    return Plan("systemd", tuple(units), summary)


def supervisord_program() -> list[str] | None:
    """How to run the real supervisord, if it is installed (this interpreter's package, else PATH)."""
    try:
        import supervisor.supervisord  # noqa: F401
    except ImportError:
        found = shutil.which("supervisord")
        return [found] if found else None
    return [sys.executable, "-m", "supervisor.supervisord"]


def supervisord_simulated(entries: Sequence[tuple[str, str]], opts: Options) -> Plan:
    """supervisord's defaults without supervisord: TERM to each program, SIGKILL after stopwaitsecs."""
    t = _timeout("supervisord", opts)
    names = [name for name, _ in entries]
    units = tuple(Unit(name, command_argv(cmd)[0], Policy(signal_to=MAIN, timeout=t, kill_to=MAIN,
                                                          after=tuple(names[i + 1:i + 2])), name)
                  for i, (name, cmd) in enumerate(entries))
    return Plan("supervisord", units, f"(simulated: supervisord is not installed) one program at a time, "
                f"last configured first: stopsignal TERM, SIGKILL after stopwaitsecs={t:g}")
