"""Clients of the several-host bed (tests/hosts.py): post jobs through the balancer and long-poll them.

Run in the balancer's namespace: ``python -m tests.hostload --target http://10.231.1.1:8080 --out f.json``.
Each client posts a sleep job of a length drawn from ``--mix``, long-polls it
until it ends, thinks, and again; on SIGTERM it posts no more, sees its last
job end (or gives up after ``--finish`` seconds) and the record of every
request and job is written to ``--out``. One new connection per request, so
an outcome is the server's and the balancer's, never a stale keep-alive's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tests import netns

if TYPE_CHECKING:
    from tests import hosts

FINISHED = ("succeeded", "failed")


class Client(threading.Thread):
    def __init__(self, index: int, args: argparse.Namespace, stopping: threading.Event,
                 record: dict[str, list[Any]], lock: threading.Lock) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.args, self.stopping, self.record, self.lock = args, stopping, record, lock
        target = urlsplit(args.target)
        self.host, self.port = target.hostname, target.port or 80
        self.random = random.Random(index)
        lengths, weights = zip(*(map(float, item.split(":")) for item in args.mix.split(",")), strict=True)
        self.lengths, self.weights = lengths, weights

    def request(self, kind: str, method: str, path: str, body: Any = None,
                timeout: float = 10) -> tuple[int | None, Any]:
        """One request on a new connection: (status, JSON body), recorded with its outcome."""
        started = time.time()
        status, payload, outcome = None, None, "answered"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            headers = {"Connection": "close"}
            data = None
            if body is not None:
                data, headers["Content-Type"] = json.dumps(body), "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            status, raw = response.status, response.read()
            if status >= 500:
                outcome = f"{status}"
            else:
                payload = json.loads(raw) if raw else None
        except ConnectionRefusedError:
            outcome = "refused"
        except TimeoutError:
            outcome = "timeout"
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                http.client.IncompleteRead):
            outcome = "reset"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            outcome = f"error: {type(exc).__name__}: {exc}"
        finally:
            conn.close()
        with self.lock:
            self.record["requests"].append({"t": started, "took": time.time() - started, "kind": kind,
                                            "status": status, "outcome": outcome})
        return (status if outcome == "answered" else None), payload

    def run(self) -> None:
        while not self.stopping.is_set():
            seconds = self.random.choices(self.lengths, self.weights)[0]
            posted = time.time()
            body = {"task": "sleep", "args": {"seconds": seconds}}
            status, answer = self.request("post", "POST", "/jobs", body)
            if status == 202:
                job = {"id": answer["id"], "seconds": seconds, "posted": posted, "seen_end": None,
                       "status": None}
                with self.lock:
                    self.record["jobs"].append(job)
                self.follow(job)
            elif status is None:
                time.sleep(0.2)  # the balancer said no: a client backs off a moment
            self.stopping.wait(self.random.uniform(0, 2 * self.args.think))

    def follow(self, job: dict[str, Any]) -> None:
        """Long-poll the job until it ends; after SIGTERM, for ``--finish`` seconds at most."""
        give_up: float | None = None
        while True:
            if self.stopping.is_set():
                give_up = give_up or time.monotonic() + self.args.finish
                if time.monotonic() > give_up:
                    return
            asked = time.monotonic()
            status, body = self.request("poll", "GET", f"/jobs/{job['id']}?wait=20", timeout=40)
            if status == 200 and body["status"] in FINISHED:
                job["seen_end"], job["status"] = time.time(), body["status"]
                return
            if status != 200 or time.monotonic() - asked < 0.2:
                time.sleep(0.2)  # an error, or a server that ignores ?wait= (the bench's reference)


@dataclass
class Load:
    """The clients (tests/hostload.py) running in the ``lb`` namespace; :meth:`finish` gives their record."""

    bed: hosts.Bed
    clients: int = 32
    mix: str = "0.2:6,1:3,6:1"  # seconds:weight; 6 s is longer than the grace
    think: float = 0.5
    follow_for: float = 90  # after SIGTERM, how long a client follows its last job (s)
    out: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.progress = self.bed.root / "load.json.progress"
        self.progress.unlink(missing_ok=True)  # an earlier load's count
        self.out = self.bed.root / "load.json"
        argv = [sys.executable, "-m", "tests.hostload", "--target", self.bed.lb_url,
                "--clients", str(self.clients), "--mix", self.mix, "--think", str(self.think),
                "--finish", str(self.follow_for), "--out", str(self.out)]
        self.log = open(self.bed.root / "load.log", "wb")  # noqa: SIM115
        in_lb = netns.command(self.bed.net.ns("lb"), argv)
        self.proc = subprocess.Popen(in_lb, cwd=Path(__file__).parents[1], stdout=self.log, stderr=self.log,
                                     start_new_session=True)

    def accepted(self) -> int:
        """Jobs accepted so far, as the clients count them."""
        return int(self.progress.read_text() or 0) if self.progress.exists() else 0

    def wait_accepted(self, more: int, timeout: float = 60) -> None:
        """Until the clients have had ``more`` jobs accepted beyond those so far (the load is flowing)."""
        count = self.accepted() + more
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.accepted() >= count:
                return
            assert self.proc and self.proc.poll() is None, (self.bed.root / "load.log").read_text()
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} jobs accepted within {timeout} s")

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        """Stop posting, let every client see its last job end; the record of every request and job."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        self.log.close()
        return json.loads(self.out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--mix", default="0.2:6,1:3,6:1", help="job seconds:weight, comma-separated")
    parser.add_argument("--think", type=float, default=0.5, help="mean pause between jobs (s)")
    parser.add_argument("--finish", type=float, default=90, help="after SIGTERM, how long to follow jobs (s)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    stopping, lock = threading.Event(), threading.Lock()
    record: dict[str, list[Any]] = {"requests": [], "jobs": []}
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    clients = [Client(i, args, stopping, record, lock) for i in range(args.clients)]
    for client in clients:
        client.start()
    progress = args.out.with_name(args.out.name + ".progress")
    while any(c.is_alive() for c in clients):
        with lock:
            accepted = len(record["jobs"])
        progress.write_text(str(accepted))
        for client in clients:
            client.join(0.5 / len(clients))
    with lock:
        args.out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
