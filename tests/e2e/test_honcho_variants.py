"""Every way honcho (and foreman) runs or dies: the busy set stops gracefully and nothing is left running.

The variants users run: in a terminal (Ctrl+C); without one (setsid, stdin
/dev/null, output to a file: CI, a service manager, ``nohup``, Docker
without ``-t``) and the manager SIGKILLed; the output piped (``scripts/start
| tee FILE`` and ``| head``, the ^C typed into the terminal whose foreground
job is the whole pipeline, so ``tee`` dies of it too). When the manager or
its reader is gone nobody prints the programs' shutdown lines, so the proof
is each process's exit status (tests/exits.py): every program exits 0, no
process dies of SIGKILL, none is left running. One data directory through
all the variants: each start runs the jobs the previous stop handed back.
"""

from __future__ import annotations

import os
import shlex
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.e2e.test_deploy_foreman import foreman
from tests.exits import Ended, ExitWatch
from tests.procset import ProcessSet
from tests.supervised import write_env
from tests.workload import Outcomes, Workload, wait_ready
from tools.stopcheck.honcho import Honcho

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

JOB_SECONDS = 4.5  # longer than the grace (3 s): handed back at each stop
#: The programs of the set (their `sh -c` wrappers, honcho's readers and the pipeline's tools aside).
PROGRAMS = ("gunicorn", "celery", "-m broker", "valkey-server", "redis-server")


class VariantSet(ProcessSet):
    """A ProcessSet whose manager may run with no terminal (output to a file)."""

    def __init__(self, workdir: Path, *, terminal: bool, **kwargs: object) -> None:
        super().__init__(workdir, **kwargs)  # type: ignore[arg-type]
        self.has_terminal = terminal

    def start(self) -> None:
        out = self.workdir / f"output-{self.starts + 1}.log"
        terminal = Honcho(self.cwd, None, command=self.command or None, env=self.env,
                          terminal=self.has_terminal, output=out)
        terminal.start()
        self.terminals.append(terminal)
        self.proc = terminal.proc
        self.starts += 1


@dataclass(frozen=True)
class Variant:
    name: str
    command: str  # run by bash -c in the set's working directory; {port}, {env}, {log} filled in
    terminal: bool
    stop: str  # "ctrl_c": ^C typed into the terminal; "kill": SIGKILL to the manager; "hangup": closed


HONCHO = "honcho start --no-colour"
#: A pipeline as an interactive shell runs it: a job (process group) of its own in the terminal's
#: foreground, the shell outside it (so the shell's exit cannot hang up the job's stragglers).
JOB = "set -m; "
FOREMAN = "{foreman} start -f Procfile -d . -e {env} -p {port} -t 5"
HONCHO_VARIANTS = [
    Variant("honcho, terminal, Ctrl+C", f"exec {HONCHO}", True, "ctrl_c"),
    Variant("honcho, no terminal, SIGKILL", f"exec {HONCHO}", False, "kill"),
    Variant("honcho, terminal closed", f"exec {HONCHO}", True, "hangup"),
    Variant("scripts/start | tee, Ctrl+C", f"{JOB}scripts/start | tee {{log}}", True, "ctrl_c"),
    Variant("scripts/start | head, Ctrl+C", f"{JOB}scripts/start | head -n 5", True, "ctrl_c"),
]
FOREMAN_VARIANTS = [
    Variant("foreman | tee, Ctrl+C", f"{JOB}{FOREMAN} | tee {{log}}", True, "ctrl_c"),
    Variant("foreman, no terminal, SIGKILL", f"exec {FOREMAN}", False, "kill"),
]


@pytest.fixture
def watch() -> Iterator[ExitWatch]:
    w = ExitWatch()
    yield w
    w.close()


def is_program(row: Ended) -> bool:
    return not row.command.startswith(("/bin/sh -c", "sh -c")) and any(p in row.command for p in PROGRAMS)


def stored(ps: ProcessSet) -> dict[str, dict[str, object]]:
    with closing(sqlite3.connect(ps.var / "app.db")) as db:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT id, status, attempts, started_at FROM jobs")}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # the ledger's clock


def after_restart(ps: ProcessSet, previous: Workload, began: datetime) -> str:
    """On the restarted (ready) set: every job the previous stop had accepted ran, none lost."""
    verdict = previous.verdict(ps, timeout=60)
    verdict.assert_none_lost()
    jobs = stored(ps)
    again = max((datetime.fromisoformat(str(jobs[j]["started_at"])) - began).total_seconds()
                for j in previous.long_ids)
    return (f"; after the restart {len(verdict.failed) + len(verdict.late)} of {verdict.accepted} jobs lost,"
            f" the handed-back ones started again {again:.2f} s after the restart began")


def run_variant(tmp_path: Path, variant: Variant, watch: ExitWatch, sets: list[VariantSet],
                previous: Workload | None) -> tuple[Workload, str, str | None]:
    """Start the set the variant's way, check the previous stop's jobs ran, load it, stop it, check.

    Returns the load (its jobs are checked at the next start), what the stop did, and what became of
    the previous stop's jobs.
    """
    env_file = write_env(tmp_path / "foreman.env", {})
    ps = VariantSet(tmp_path, terminal=variant.terminal, runs_honcho=True, env={"WORKER_CONCURRENCY": "4"})
    sets.append(ps)
    ps.command = ["bash", "-c", variant.command.format(
        port=ps.port, env=shlex.quote(str(env_file)), log=shlex.quote(str(tmp_path / "tee.log")),
        foreman=shlex.quote(foreman()) if "{foreman}" in variant.command else "")]
    began = utcnow()
    ps.start()
    wait_ready(ps, timeout=120)
    restarted = after_restart(ps, previous, began) if previous is not None else None
    load = Workload(ps, jobs=2, job_seconds=JOB_SECONDS, threads=2)
    load.start()
    ps.snapshot()
    assert ps.proc is not None
    started = time.monotonic()
    if variant.stop == "ctrl_c":
        ps.ctrl_c()
    elif variant.stop == "hangup":  # SIGHUP to honcho and its readers: the programs' output pipes break
        ps.terminal.close_pty()
    else:  # the manager itself (the variant's command execs it)
        os.kill(ps.proc.pid, signal.SIGKILL)
    rows = watch.wait_gone(ps.proc.pid, timeout=40)
    outcomes = load.finish()
    ps.terminal.wait(10)
    survivors = ps.survivors()
    ps.cleanup()

    where = f"{variant.name}:\n" + "\n".join(f"  {r.pid} {r.exit} {r.command[:100]}" for r in rows) \
        + "\n" + "\n".join(ps.output.splitlines()[-40:])
    left = [r for r in rows if r.exit is None]
    assert not left and not survivors, f"left running: {left} {survivors}\n{where}"
    killed = [r for r in rows if r.exit == "SIGKILL"]
    assert not killed, f"SIGKILLed: {killed}\n{where}"
    programs = [r for r in rows if is_program(r)]
    assert len(programs) >= 8, where  # web master + 2 workers, Celery + 2 children, beat, broker + server
    assert all(r.exit == "0" for r in programs), where  # each stopped by itself, gracefully
    outcomes.assert_clean()
    jobs = stored(ps)
    for job_id in load.long_ids:
        assert (jobs[job_id]["status"], jobs[job_id]["attempts"]) == ("queued", 0), (jobs[job_id], where)
    stop_time = max(r.at for r in rows if r.at is not None) - started
    return load, summary(variant, stop_time, rows, outcomes, len(load.long_ids)), restarted


def summary(variant: Variant, stop_time: float, rows: list[Ended], outcomes: Outcomes,
            handed_back: int) -> str:
    sigkilled = sum(1 for r in rows if r.exit == "SIGKILL")
    return (f"{variant.name}: every process gone {stop_time:.2f} s after the stop, {sigkilled} SIGKILL, "
            f"{len(rows)} processes, 0 left running; requests {dict(outcomes.counts)}, "
            f"long poll {outcomes.long_poll}; {handed_back} jobs handed back")




def run_chain(tmp_path: Path, variants: list[Variant], watch: ExitWatch) -> None:
    sets: list[VariantSet] = []
    lines = []
    try:
        previous = None
        for variant in variants:
            previous, line, restarted = run_variant(tmp_path, variant, watch, sets, previous)
            if restarted is not None:
                lines[-1] += restarted
            lines.append(line)
        final = VariantSet(tmp_path, terminal=True, runs_honcho=True)
        sets.append(final)
        began = utcnow()
        final.start()
        final.wait_ready(timeout=120)
        assert previous is not None
        lines[-1] += after_restart(final, previous, began)
        final.stop_and_wait("ctrl_c")
    finally:
        for each in sets:
            each.cleanup()
        print("\n" + "\n".join(lines))


def test_honcho_every_way_it_runs_or_dies(tmp_path: Path, watch: ExitWatch) -> None:
    run_chain(tmp_path, HONCHO_VARIANTS, watch)


def test_foreman_piped_or_killed(tmp_path: Path, watch: ExitWatch) -> None:
    run_chain(tmp_path, FOREMAN_VARIANTS, watch)
