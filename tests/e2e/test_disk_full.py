"""VAR_DIR on a small disk that fills up: clear answers, no process dies, and it carries on (issue 7).

The disk is a 16 MiB tmpfs mounted for the test (root only; CI runs as root).
Filled to the last byte, it holds the embedded Redis's AOF, SQLite's
database and beat's schedule: the three writers of the set.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.checks import assert_clean_stop
from tests.procset import ProcessSet
from tests.servers import missing

FILL_CHUNK = b"\0" * 65536


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted at the end (after the set's processes are gone)."""
    if os.geteuid() != 0:
        missing("the full-disk test mounts a tmpfs: it must run as root", "REQUIRE_ROOT")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:  # the set's processes were killed just before; the last may still be exiting
        deadline = time.monotonic() + 10
        while subprocess.run(["umount", str(mount)], check=False, capture_output=True).returncode:
            if time.monotonic() > deadline:
                subprocess.run(["umount", "--lazy", str(mount)], check=True)
                break
            time.sleep(0.1)


def fill(path: Path) -> int:
    """Write ``path`` until the disk has no byte left; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        chunk = FILL_CHUNK
        while len(chunk):
            try:
                written += f.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                chunk = chunk[: len(chunk) // 2]  # down to the last byte
    return written


def refused_calls(socket: Path, command: str) -> int:
    """How many times Redis refused ``command`` (MISCONF included), from INFO commandstats."""
    with redis.Redis(unix_socket_path=str(socket)) as client:
        stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("rejected_calls", 0))


def test_a_full_disk_is_a_clear_answer_and_the_set_carries_on(small_disk: Path, procset: ProcessSet) -> None:
    ps = procset.make(VAR_DIR=str(small_disk / "var"), SWEEP_INTERVAL_SECONDS="1")
    ps.var = small_disk / "var"
    socket = ps.var / "redis.sock"
    ps.start()
    ps.wait_ready()
    before = ps.submit("echo", value="before")
    assert ps.job(before, wait=20)["status"] == "succeeded"
    running = ps.submit("sleep", seconds=3)  # finishes while the disk is full
    ps.wait_status(running, "running")

    filler = small_disk / "filler"
    assert fill(filler) > 0
    refused = [ps.http("POST", "/jobs", {"task": "echo", "args": {"value": n}}) for n in range(3)]
    ready = ps.http("GET", "/readyz")
    # Anything that writes to Redis now fails to reach its AOF: from then on Redis refuses
    # every write (MISCONF), the worker's BRPOP included, until a write succeeds again.
    with redis.Redis(unix_socket_path=str(socket)) as client:
        try:
            for n in range(50):
                client.set(f"disk-full-probe-{n}", "x" * 4096)
        except redis.RedisError:
            pass
    deadline = time.monotonic() + 30
    while refused_calls(socket, "brpop") < 1:  # the worker's consumer has met the full disk
        assert time.monotonic() < deadline and ps.proc.poll() is None, ps.output
        time.sleep(0.1)
    filler.unlink()  # space is back
    back = time.monotonic()

    after = ps.submit("echo", value="after")  # accepted and run again
    job = ps.job(after, wait=30)
    if job["status"] != "succeeded":
        job = ps.job(after, wait=30)
    assert (job["status"], job["result"]) == ("succeeded", "after"), (job, ps.output)
    job = ps.job(running, wait=30)
    assert (job["status"], job["attempts"]) == ("succeeded", 1), (job, ps.output)
    recovered = time.monotonic() - back
    stopped = [line for line in ps.output.splitlines() if " stopped (rc=" in line]
    assert not stopped, ps.output  # no process of the set exited

    for answer in refused:
        assert answer.status in (503, 507), (answer, ps.output)  # never 500
        assert answer.body["error"]["status"] == answer.status, answer
        assert "disk" in answer.body["error"]["message"], answer
    assert ready.status == 503, ready
    assert any("disk" in reason for reason in ready.body["reasons"]), ready
    print(f"\nFull disk: POST {[a.status for a in refused]}, /readyz {ready.status} {ready.body['reasons']}; "
          f"a new job and the one running meanwhile succeeded {recovered:.1f} s after space was freed")

    rc, _ = ps.stop_and_wait("ctrl_c")
    assert_clean_stop(ps, rc, 130)
