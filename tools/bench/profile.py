"""``scripts/bench --profile``: where the CPU goes while each set runs 1,000 jobs.

py-spy samples the web (gunicorn master and workers) and the worker (Celery
MainProcess and pool children) of each set during the same end-to-end run
the benchmark times, and writes, per set and part, the functions with the
most samples: on top of the stack (own) and including callees. Idle threads
are left out.
py-spy attaches with ptrace: run as root, or allow it (``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.procset import free_port
from tools.bench.session import CLIENTS, E2E_JOBS, RESULTS, SETS, Session, SetSpec, role_of

PARTS = ("web", "worker")
OWN_CODE = re.compile(r"\((app|tasks|core|jobs|stopright)/|\(ref(app|tasks)\.py")
TOP = 25


def _top_process(ps: Session, part: str) -> psutil.Process:
    """The part's parent process (gunicorn master, Celery MainProcess): py-spy follows its children."""
    for p in ps.ps.snapshot():
        try:
            if role_of(p.cmdline()) == part and role_of(p.parent().cmdline()) != part:
                return p
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError(f"no {part} process found")


def summarize(raw: Path) -> str:
    """py-spy's raw (collapsed) stacks as two rankings: own samples and samples including callees."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        n = int(count)
        total += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    ours = [(name, n) for name, n in inclusive.most_common() if OWN_CODE.search(name)]
    out = [f"{total} samples of active threads, all processes of the part. py-spy's idle filter",
           "misses some blocking calls (time.sleep, pipe and socket reads): read those as waiting.",
           "", "own (the function on top of the stack):"]
    out += [f"{n / total:6.1%}  {name}" for name, n in own.most_common(TOP)]
    out += ["", "including callees, this code's functions only:"]
    out += [f"{n / total:6.1%}  {name}" for name, n in ours[:TOP]]
    return "\n".join(out) + "\n"


def profile_set(spec: SetSpec, workdir: Path, out: Path, py_spy: str) -> float:
    s = Session(spec, workdir, free_port())
    spies: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
    try:
        s.start()
        s.wait_first_job()
        for part in PARTS:
            raw = workdir / f"{part}.raw"
            pid = _top_process(s, part).pid
            spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--subprocesses",
                                    "--format", "raw", "--rate", "200", "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            spies.append((part, raw, spy))
        time.sleep(1.0)  # py-spy attaches to every process of the tree (not timed)
        body = json.dumps({"task": "sleep", "args": {"seconds": 0}})
        submit = s.load("--method", "POST", "--path", "/jobs", "--body", body, "--count", str(E2E_JOBS),
                        "--concurrency", str(CLIENTS), "--ids")
        done_at, _ = s.wait_terminal(submit["ids"], timeout=120)
        for part, raw, spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            _, err = spy.communicate(timeout=30)
            if not raw.exists():
                raise RuntimeError(f"py-spy wrote nothing for {part}: {err.decode(errors='replace')[-500:]}")
            (out / f"profile-{spec.key}-{part}.txt").write_text(
                f"# {spec.label}, {part}: {E2E_JOBS} zero-second jobs, {CLIENTS} clients\n" + summarize(raw))
        s.stop()
        return len(submit["ids"]) / (done_at - submit["started"])
    finally:
        for _, _, spy in spies:
            if spy.poll() is None:
                spy.kill()
        s.ps.cleanup()


def main() -> int:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: pip install -r requirements-bench.txt", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        for spec in SETS:
            rate = profile_set(spec, Path(tmp) / spec.key, RESULTS, py_spy)
            print(f"{spec.label}: {rate:.0f} jobs/s under py-spy; "
                  + ", ".join(f"tools/bench/results/profile-{spec.key}-{part}.txt" for part in PARTS))
    return 0
