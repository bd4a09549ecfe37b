"""Every phase of the worker's stop has a deadline; an overrun is logged with stacks and cut (issue 7).

Real hangs are provoked from outside: a pool child frozen with SIGSTOP
(it can neither hand its job back nor exit), and a broker frozen the same
way while the worker closes its consumer. Also: SIGURG makes every
process of the set write its stacks and carry on.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil

from tests.e2e.checks import PROCESSES, assert_clean_stop
from tests.e2e.test_direct_ctrl_c import WORKER, broker, queue_job  # noqa: F401  (broker: a fixture)
from tests.e2e.test_stranded_jobs import _pool_children
from tests.procset import ProcessSet

DUMP_HEADER = "(most recent call first):"  # faulthandler's line before each thread's stack


def test_frozen_pool_children_are_killed_at_their_deadlines_and_no_job_is_lost(procset: ProcessSet) -> None:
    procset.start()
    procset.wait_ready()
    job_id = procset.submit("sleep", seconds=60)
    procset.wait_status(job_id, "running")
    for child in _pool_children(procset):  # one runs the job, one is idle: neither can act now
        child.send_signal(signal.SIGSTOP)
    rc, _ = procset.stop_and_wait("ctrl_c")

    # The busy child cannot hand back: killed after the grace and the hand-back deadline,
    # and the MainProcess queues its job itself. The idle one cannot exit: killed too.
    assert_clean_stop(procset, rc, 130)
    out = procset.output
    assert re.search(rf"did not hand back job {job_id} within [\d.]+ s: SIGKILL", out), out
    assert f"job {job_id} handed back to the queue for its killed pool child" in out
    assert "stop phase overran: the pool's children did not exit" in out
    assert "stop phase overran: stack of thread MainThread" in out
    stored = procset.stored_jobs()[job_id]
    assert (stored["status"], stored["attempts"]) == ("queued", 0), stored

    again = procset.make()
    again.start()
    again.wait_ready()
    again.wait_status(job_id, "running")  # its message came back to the queue
    rc, _ = again.stop_and_wait("sigterm")
    assert_clean_stop(again, rc, 143)


def _redis_server(var: Path) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if ("redis-server" in line or "valkey-server" in line) and str(var) in line:  # the wheel's is Valkey
            return p
    raise AssertionError(f"no redis-server for {var}")


def test_a_worker_whose_broker_freezes_during_its_stop_still_exits(tmp_path: Path,
                                                                   broker: dict[str, str]) -> None:  # noqa: F811
    ps = ProcessSet(tmp_path, command=WORKER)
    server = _redis_server(Path(broker["VAR_DIR"]))
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60)
        queue_job(broker, "echo", {"value": 1})  # the consumer has really talked to the broker
        ps.wait_for_line(r"Task jobs.run\[.*\] succeeded", timeout=30)
        server.send_signal(signal.SIGSTOP)  # connected, but silent
        rc, _ = ps.stop_and_wait("ctrl_c", timeout=30)
    finally:
        server.send_signal(signal.SIGCONT)
        ps.cleanup()
    assert rc in (0, 1), ps.output  # 1 if its close had to be cut short
    assert "shutdown complete in" in ps.output
    assert not ps.survivors()


def test_a_worker_whose_exit_hangs_on_a_stuck_thread_is_made_to_exit(tmp_path: Path,
                                                                      broker: dict[str, str]) -> None:  # noqa: F811
    ps = ProcessSet(tmp_path, command=[*WORKER, "--include", "tests.e2e.stuck_thread"])
    try:
        ps.start()
        ps.wait_for_line(r"\bready\.$", timeout=60)
        rc, _ = ps.stop_and_wait("ctrl_c", timeout=30)
    finally:
        ps.cleanup()
    out = ps.output
    assert "stop phase overran: the process did not exit after closing its connections" in out, out
    assert re.search(r"stop phase overran: stack of thread never-ends:", out), out
    assert "worker exits now (exit code 0)" in out  # everything was closed before
    assert rc == 0
    assert not ps.survivors()


def _dumps(ps: ProcessSet, name: str) -> int:
    return sum(DUMP_HEADER in line for line in ps.lines(name))


def test_sigurg_makes_every_process_write_its_stacks_and_carry_on(procset: ProcessSet) -> None:
    procset.start()
    procset.wait_ready()
    by_name: dict[str, list[psutil.Process]] = {name: [] for name in PROCESSES}
    for p in procset.snapshot():
        argv = p.cmdline()
        line = " ".join(argv)
        if argv[1:2] == ["-c"]:
            continue  # the `sh -c` honcho runs each line in
        if "gunicorn" in line:
            by_name["web"].append(p)  # the master and each worker
        elif "celery" in line and " worker" in line:
            by_name["worker"].append(p)  # the MainProcess and each pool child
        elif "celery" in line and " beat" in line:
            by_name["beat"].append(p)
        elif "broker.launcher" in line:
            by_name["broker"].append(p)
    assert [len(by_name[n]) for n in PROCESSES] == [3, 3, 1, 1], by_name

    for name, processes in by_name.items():
        for p in processes:
            before = _dumps(procset, name)
            p.send_signal(signal.SIGURG)
            deadline = time.monotonic() + 10
            while _dumps(procset, name) == before:
                assert time.monotonic() < deadline, f"no stack dump from {name} {p.pid}:\n{procset.output}"
                time.sleep(0.05)

    job_id = procset.submit("echo", value="still serving")
    assert procset.job(job_id, wait=20)["result"] == "still serving"
    rc, _ = procset.stop_and_wait("ctrl_c")
    assert_clean_stop(procset, rc, 130)
