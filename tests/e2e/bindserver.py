"""gunicorn alone, with stopright's hooks, on any bind; and a stream of clients counted by outcome.

For tests/e2e/test_binds.py. The server is started as a user starts it: a
``gunicorn.conf.py`` of the user's (``from stopright.gunicorn_hooks import *``
plus hooks of its own, which also install a SIGALRM handler of the app's),
its own session (a manager signals the whole group), output to a file (a
master started by ``USR2`` writes there too). Every process seen is killed
by pid at the end (tests/procset.py ``ProcessTree``).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.procset import ProcessTree

APP = '''
import os, sys, time
import stopright

stopright.register("app resources", lambda: None)

def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        print(f"slow request in {os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(float(environ["QUERY_STRING"]))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
'''

CONF = '''
import os, signal
from stopright import gunicorn_hooks as stopright
from stopright.gunicorn_hooks import *  # noqa: F403

workers = 2
threads = 4
control_socket_disable = True


def _alarm(signum, frame):  # the app's own SIGALRM handler (a request timeout, say)
    os.write(2, f"app alarm in {os.getpid()}\\n".encode())


def on_starting(server):
    signal.signal(signal.SIGALRM, _alarm)
    stopright.on_starting(server)


def post_fork(server, worker):
    signal.signal(signal.SIGALRM, _alarm)
    stopright.post_fork(server, worker)
'''


class Gunicorn(ProcessTree):
    """``python -m gunicorn -c conf.py <args> bindapp:app`` in ``workdir`` (or ``launcher`` execs it)."""

    def __init__(self, workdir: Path, args: list[str], *, env: dict[str, str] | None = None,
                 launcher: list[str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "bindapp.py").write_text(APP)
        (workdir / "bindconf.py").write_text(CONF)
        self.log_path = workdir / "gunicorn.log"
        self.command = [*(launcher or []), sys.executable, "-m", "gunicorn", "-c", "python:bindconf", *args,
                        "bindapp:app"]
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SHUTDOWN_", "HONCHO_"))},
                    "PYTHONPATH": str(workdir), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = None
        self._seen = {}

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, cwd=self.workdir, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def masters(self) -> list[int]:
        """Every master that started, in order (the one a USR2 started comes second)."""
        return [int(m) for m in re.findall(r"\[(\d+)\] \[INFO\] Listening at: ", self.output)]

    def workers(self, master: int | None = None) -> list[int]:
        """Worker pids, in boot order (of ``master`` only: the pids booted after its start line)."""
        out = self.output
        if master is not None:
            out = out[out.index(f"[{master}] [INFO] Starting gunicorn"):]
        return [int(m) for m in re.findall(r"Booting worker with pid: (\d+)", out)]

    def wait_for(self, pattern: str, timeout: float = 60, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.output)) < count:
            self.snapshot()
            assert time.monotonic() < deadline, f"no {pattern!r} x{count}:\n{self.output}"
            time.sleep(0.05)
        self.snapshot()

    def wait_exit(self, pid: int, timeout: float = 60) -> None:
        """Until process ``pid`` (ours or not) is gone."""
        deadline = time.monotonic() + timeout
        while running(pid):
            if self.proc is not None and pid == self.proc.pid:
                self.proc.poll()  # reap it
            assert time.monotonic() < deadline, f"{pid} still running:\n{self.output}"
            time.sleep(0.02)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is no zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Target:
    """Where the clients connect: ``("127.0.0.1", port)``, ``("::1", port)`` or a Unix socket path."""

    host: str
    port: int = 0

    @property
    def bind(self) -> str:
        if self.port == 0:
            return f"unix:{self.host}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.port == 0:
            return UnixHTTPConnection(self.host, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


REFUSED = (ConnectionRefusedError, FileNotFoundError)  # a Unix socket's path is removed at the stop
RESET = (http.client.RemoteDisconnected, http.client.BadStatusLine, http.client.IncompleteRead,
         ConnectionError)


def request(target: Target, path: str = "/", timeout: float = 15) -> tuple[str, bytes]:
    """One GET on a new connection: (outcome, body); "answered", "4xx", "5xx", "refused", "reset", "hung"."""
    conn = target.connection(timeout)
    try:
        try:
            conn.connect()
        except REFUSED:
            return "refused", b""
        except TimeoutError:  # a SYN nobody answered (dropped by a socket filter)
            return "hung", b""
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        except RESET:
            return "reset", b""
        except TimeoutError:
            return "hung", b""
        status = response.status
        return ("answered" if status < 400 else f"{status // 100}xx"), body
    except OSError as e:  # anything else: counted, never hidden
        return f"oserror:{e.__class__.__name__}", b""
    finally:
        conn.close()


@dataclass
class Stream:
    """``threads`` clients, each GET after GET on new connections, until :meth:`finish`."""

    target: Target
    threads: int = 6
    results: list[tuple[float, float, str, bytes]] = field(default_factory=list)  # start, end, outcome, body

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def start(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            outcome, body = request(self.target)
            with self._lock:
                self.results.append((started, time.monotonic(), outcome, body))
            if outcome != "answered":
                self._stop.wait(0.05)  # a stopped server is not hammered

    def answered_since(self, since: float) -> list[int]:
        """The pid that answered each request started at ``since`` or later."""
        with self._lock:
            return [int(body) for start, _, outcome, body in self.results
                    if start >= since and outcome == "answered"]

    def wait_answers(self, count: int, since: float = 0.0, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answered_since(since)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} answers: {self.counts()}"
            time.sleep(0.02)

    def finish(self) -> Counter[str]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a request never ended"
        return self.counts()

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(outcome for _, _, outcome, _ in self.results)

    def longest_wait(self) -> float:
        with self._lock:
            return max((end - start for start, end, _, _ in self.results), default=0.0)


class Slow(threading.Thread):
    """One request that takes ``seconds`` to answer, in flight while the server stops."""

    def __init__(self, target: Target, seconds: float) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.seconds = seconds
        self.outcome = "not sent"

    def run(self) -> None:
        self.outcome, _ = request(self.target, f"/slow?{self.seconds}", timeout=60)


def socket_holders(inode: int) -> list[int]:
    """Every process with socket ``inode`` open (readable /proc entries only)."""
    target = f"socket:[{inode}]"
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                holders.append(int(pid))
        except OSError:
            continue
    return holders


def listener_inode(master: int) -> int:
    """The inode of the listening socket of gunicorn's ``master`` (its only listening socket)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            listening |= {int(r.split()[9]) for r in list(rows)[1:] if r.split()[3] == "0A"}
    with open("/proc/net/unix") as rows:  # Flags 00010000: accepting connections
        listening |= {int(r.split()[6]) for r in list(rows)[1:] if r.split()[3] == "00010000"}
    mine = set()
    for fd in os.listdir(f"/proc/{master}/fd"):
        try:
            link = os.readlink(f"/proc/{master}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            mine.add(int(link[8:-1]))
    found = mine & listening
    assert len(found) == 1, (mine, listening)
    return found.pop()


def report(name: str, counts: Counter[str], stop_seconds: float, sigkills: int, longest: float) -> str:
    """The figures of one stop, printed by the test (pytest -s shows them)."""
    by_outcome = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    line = (f"[{name}] stop {stop_seconds:.2f} s, SIGKILLs {sigkills}, requests: {by_outcome}; "
            f"longest wait {longest:.2f} s")
    print(line)
    return line
