"""Several hosts on one machine: the set on hosts ``a`` and ``b`` behind HAProxy, one database and broker.

Hosts are network namespaces: ``lb`` (HAProxy and the clients), ``db``
(PostgreSQL, RabbitMQ or Redis), ``a`` and ``b`` (the Procfile under honcho:
web, worker, beat). Two networks, each a bridge in a namespace of its own
(``sw``): front (lb, a, b) and back (db, a, b), so a host can be cut off from
the database and broker while the balancer still reaches it, or lost
altogether. Addresses are 10.231.0.0/16, inside these namespaces only.
The test process reaches PostgreSQL and HAProxy's stats through Unix
sockets, and anything else from a thread in the namespace (tests/netns.py).
Everything is removed by pid and namespace name, also when a test fails.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy

from tests import netns
from tests.hostruns import FINISHED, Run, now_clock, runs_in
from tests.procset import ROOT
from tests.rabbitmq_node import RabbitMQServer, find_rabbitmq
from tests.servers import PostgresServer, RedisServer, find_pg_bin
from tools.stopcheck.honcho import Honcho, honcho_command

FRONT, BACK = "10.231.1.", "10.231.2."
LB_ADDRESS = FRONT + "1"
DB_ADDRESS = BACK + "10"
HOST_NUMBERS = {"a": 11, "b": 12}
WEB_PORT = 8000
LB_PORT = 8080
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"

#: The settings every host runs with here (a user's several-host set, made quick to fail over).
HOST_ENV = {
    "SHUTDOWN_DRAIN_SECONDS": "3",  # deploy/haproxy.cfg's rule
    "SHUTDOWN_GRACE_SECONDS": "3",
    "WORKER_CONCURRENCY": "24",  # either host alone carries the clients, as a rolling restart needs
    "WEB_THREADS": "24",
    "JOB_LEASE_SECONDS": "6",
    "SWEEP_INTERVAL_SECONDS": "1",
    "BEAT_LEASE_SECONDS": "4",
    "JOB_MAX_SECONDS": "60",
    "PYTHONUNBUFFERED": "1",
}


class HostSet:
    """The Procfile under honcho in one host's namespace, started and stopped as its operator would."""

    def __init__(self, bed: Bed, name: str, env: dict[str, str], procfile: Path | None = None,
                 directory: Path | None = None) -> None:
        """``procfile``/``directory``: another set's (honcho ``-f``/``-d``); default: the root's Procfile."""
        self.bed, self.name = bed, name
        self.procfile, self.directory = procfile, directory
        self.address = f"{FRONT}{HOST_NUMBERS[name]}"
        self.var = bed.root / name / "var"
        self.env = {**os.environ, **env, "BIND_HOST": self.address, "PORT": str(WEB_PORT),
                    "VAR_DIR": str(self.var)}
        for inherited in ("REDIS_URL", "CELERY_BROKER_URL"):
            if inherited not in env:
                self.env.pop(inherited, None)
        self.env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + self.env.get("PATH", "")
        self.terminals: list[Honcho] = []
        self.killed_at: float | None = None
        self.ends: list[tuple[float, str]] = []  # per terminal that ended: when (log clock), how

    def start(self) -> None:
        # A host name of its own too (a UTS namespace): Celery names its worker after it, and two
        # workers of one name lock each other out of RabbitMQ (their exclusive pidbox queue).
        named = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', f"host-{self.name}"]
        honcho = honcho_command(self.procfile, self.directory)
        terminal = Honcho(self.directory or ROOT, env=self.env,
                          command=netns.command(self.bed.net.ns(self.name), named + honcho))
        terminal.start()
        self.terminals.append(terminal)

    @property
    def terminal(self) -> Honcho:
        return self.terminals[-1]

    def lines(self, name: str | None = None) -> list[str]:
        return [text for t in self.terminals for text in t.texts(name)]

    def wait_for_line(self, pattern: str, timeout: float = 60, name: str | None = None, *,
                      after: int = 0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines(name)[after:]:
                if regex.search(line):
                    return line
            if self.terminal.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"host {self.name}: no line matching {pattern!r} within {timeout} s:\n"
                             + "\n".join(self.terminal.tail(60)))

    def wait_started(self, timeout: float = 90) -> None:
        """This start's worker consumes and its beat runs (web: see :meth:`Bed.wait_in_balancer`)."""
        deadline = time.monotonic() + timeout
        for name, pattern in (("worker", r"\bready\.$"), ("beat", r"beat: Starting")):
            regex = re.compile(pattern)
            while not any(regex.search(line) for line in self.terminal.texts(name)):
                assert time.monotonic() < deadline and self.terminal.poll() is None, (
                    f"host {self.name}: {name} not started:\n" + "\n".join(self.terminal.tail(60)))
                time.sleep(0.05)

    def restart(self, timeout: float = 60) -> tuple[float, float]:
        """One host's turn in a rolling restart: SIGTERM to honcho, out of the balancer, started
        again, back UP in HAProxy. The seconds the stop and the return took."""
        began = time.monotonic()
        self.stop(timeout=timeout)
        stopped = (self.terminal.exit_at or time.monotonic()) - began
        self.bed.wait_in_balancer(self.name, up=False, timeout=10)  # a quick stop: HAProxy has yet to see it
        began = time.monotonic()
        self.start()
        self.wait_started()
        self.bed.wait_in_balancer(self.name)
        return stopped, time.monotonic() - began

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal honcho (as a platform or an operator does) and wait for it; its exit code."""
        self.terminal.signal(signum)
        rc = self.terminal.wait(timeout)
        assert rc is not None, f"host {self.name}: honcho still running {timeout} s after {signum}"
        self.ends.append((now_clock(), "stopped with its host"))  # every process of it gone
        self.terminal.join_reader(2)
        self.terminal.close_pty()
        return rc

    def kill(self) -> None:
        """kill -9 every process of the host at once (power lost): nobody says goodbye."""
        self.killed_at = now_clock()
        self.ends.append((self.killed_at, "killed"))
        netns.kill_all(self.bed.net.ns(self.name))

    def runs(self) -> list[Run]:
        """Every run on this host, over every start; one its log never ended, ended with its start."""
        runs = []
        for index, terminal in enumerate(self.terminals):
            started = runs_in(self.name, terminal.texts("worker"))
            if index < len(self.ends):
                for run in started:
                    if run.ended is None:
                        run.ended, run.end = self.ends[index]
            runs += started
        return runs

    def close(self) -> None:
        for terminal in self.terminals:
            with contextlib.suppress(Exception):
                if terminal.poll() is None:
                    terminal.signal(signal.SIGKILL)
                terminal.proc.wait(10)
            terminal.close()


def haproxy_config(admin: Path, check: str = "/readyz", *, retries: bool = False) -> str:
    """deploy/haproxy.cfg as shipped, pointed at the bed's hosts, checking ``check``; stats on the
    Unix socket ``admin``; ``retries``: the file's optional retry lines on."""
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"(?m)^(\s*)bind \S+", rf"\1bind {LB_ADDRESS}:{LB_PORT}", text, count=1)
    # Ours where the file's first server line is: after its default-server line, which
    # applies only to the server lines below it.
    servers = "".join(f"    server {h} {FRONT}{n}:{WEB_PORT} check\n" for h, n in HOST_NUMBERS.items())
    text = re.sub(r"(?m)^\s*server \S+ \S+.*\n", lambda _: servers, text, count=1)
    text = re.sub(r"(?m)^\s*server \S+ (?!10\.231\.)\S+.*\n", "", text)
    text = re.sub(r"(?m)^\s*#?\s*stats socket .*\n", "", text)
    text = re.sub(r"(?m)^(\s*option httpchk GET )\S+", rf"\g<1>{check}", text, count=1)
    if retries:
        text = re.sub(r"(?m)^\s*retries 0\n", "", text)
        text, uncommented = re.subn(r"(?m)^(\s*)# ((retries|option redispatch|retry-on|http-request "
                                    r"disable-l7-retry)\b.*)$", r"\1\2", text)
        assert uncommented == 4, text
    return text.replace("global\n", f"global\n    stats socket {admin} mode 600 level admin\n", 1)


class Bed:
    """The whole test bed; :meth:`close` removes everything it started.

    ``procfile``, ``directory`` and ``host_env`` run another set on the hosts (the bench's
    reference), ``check`` is the path HAProxy checks, ``retries`` turns on the HAProxy file's
    optional retry lines; the defaults are this set's, as the file ships.
    """

    def __init__(self, root: Path, broker: str = "rabbitmq", *, procfile: Path | None = None,
                 directory: Path | None = None, host_env: dict[str, str] | None = None,
                 check: str = "/readyz", retries: bool = False) -> None:
        self.root = root
        self.broker_kind = broker
        self.procfile, self.directory, self.host_env, self.check = procfile, directory, host_env, check
        self.retries = retries
        self.net = netns.Network()
        self.pg: PostgresServer | None = None
        self.rabbit: RabbitMQServer | None = None
        self.redis: RedisServer | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.hosts: dict[str, HostSet] = {}
        self.admin = Path(tempfile.mkdtemp(prefix="haproxy-"))  # short path: a Unix socket name

    # -- start ---------------------------------------------------------------------------------
    def start_servers(self) -> None:
        hosts = {"lb": {"front": LB_ADDRESS}, "db": {"back": DB_ADDRESS}}
        for host, number in HOST_NUMBERS.items():
            hosts[host] = {"front": f"{FRONT}{number}", "back": f"{BACK}{number}"}
        self.net.build(hosts)
        bindir, rabbit_bin = find_pg_bin(), find_rabbitmq()
        assert bindir is not None, "no PostgreSQL server is installed"
        self.pg = PostgresServer(bindir, netns=self.net.ns("db"), listen=DB_ADDRESS, max_connections=400)
        self.pg.start()
        if self.broker_kind == "rabbitmq":
            assert rabbit_bin is not None, "no RabbitMQ server is installed"
            self.rabbit = RabbitMQServer(rabbit_bin, netns=self.net.ns("db"), address=DB_ADDRESS)
            self.rabbit.start()
        else:
            self.redis = RedisServer(self.root / "redis", netns=self.net.ns("db"), bind=DB_ADDRESS)
            self.redis.start()
        self.start_haproxy()

    @property
    def lb_url(self) -> str:
        """The balancer, as the clients on host ``lb`` reach it."""
        return f"http://{LB_ADDRESS}:{LB_PORT}"

    @property
    def broker_url(self) -> str:
        if self.rabbit is not None:
            return self.rabbit.url("")  # the default vhost "/"
        assert self.redis is not None
        return self.redis.url

    def env(self, **extra: str) -> dict[str, str]:
        if self.host_env is not None:
            return {**self.host_env, **extra}
        assert self.pg is not None
        return {**HOST_ENV, "DATABASE_URL": self.pg.url, "BROKER_URL": self.broker_url, **extra}

    def start_haproxy(self) -> None:
        config = self.root / "haproxy.cfg"
        config.write_text(haproxy_config(self.admin / "admin.sock", self.check, retries=self.retries))
        check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(self.root / "haproxy.log", "wb")  # noqa: SIM115 - HAProxy keeps its copy
        argv = netns.command(self.net.ns("lb"), ["haproxy", "-db", "-f", str(config)])
        self.haproxy = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while not (self.admin / "admin.sock").exists():
            assert time.monotonic() < deadline and self.haproxy.poll() is None, "HAProxy did not start"
            time.sleep(0.05)

    def start_host(self, name: str, **extra: str) -> HostSet:
        host = self.hosts.get(name) or HostSet(self, name, self.env(**extra), self.procfile, self.directory)
        self.hosts[name] = host
        host.start()
        return host

    # -- look ----------------------------------------------------------------------------------
    def haproxy_admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin / "admin.sock"))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """The balancer's view of each host: UP, DOWN, MAINT ... (``show stat``)."""
        text = self.haproxy_admin("show stat").lstrip("# ")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row["svname"] in HOST_NUMBERS}

    def wait_in_balancer(self, name: str, up: bool = True, timeout: float = 90) -> float:
        """Wait until HAProxy has ``name`` up (or down); the seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            state = self.server_states().get(name, "")
            if state.startswith("UP") if up else not state.startswith("UP"):
                return time.monotonic() - start
            time.sleep(0.05)
        told = self.hosts[name].lines("system") + self.hosts[name].terminal.tail(40)
        raise AssertionError(f"host {name} not {'up' if up else 'down'} in HAProxy within {timeout} s: "
                             f"{self.server_states()}\n" + "\n".join(told))

    def post_job(self, seconds: float) -> str:
        """POST a sleep job through the balancer, as a client on the ``lb`` host; its id."""
        def post() -> str:
            conn = http.client.HTTPConnection(LB_ADDRESS, LB_PORT, timeout=10)
            try:
                conn.request("POST", "/jobs", json.dumps({"task": "sleep", "args": {"seconds": seconds}}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
                assert response.status == 202, (response.status, body)
                return json.loads(body)["id"]
            finally:
                conn.close()

        return netns.run_in(self.net.ns("lb"), post)

    def wait_jobs(self, ids: list[str], timeout: float = 120) -> dict[str, dict[str, Any]]:
        """Until every job in ``ids`` has ended; their ledger rows."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.jobs()
            if all(rows.get(i, {}).get("status") in FINISHED for i in ids):
                return {i: rows[i] for i in ids}
            assert time.monotonic() < deadline, {i: rows.get(i, {}).get("status") for i in ids}
            time.sleep(0.2)

    def ledger(self, query: str, **params: Any) -> list[dict[str, Any]]:
        assert self.pg is not None
        engine = sqlalchemy.create_engine(self.pg.socket_url, poolclass=sqlalchemy.NullPool)
        try:
            with engine.connect() as conn:
                return [dict(row) for row in conn.execute(sqlalchemy.text(query), params).mappings()]
        finally:
            engine.dispose()

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {row["id"]: row for row in self.ledger("SELECT id, status, attempts, args, error FROM jobs")}

    def runs(self) -> list[Run]:
        return sorted((run for host in self.hosts.values() for run in host.runs()), key=lambda r: r.started)

    # -- end -----------------------------------------------------------------------------------
    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        for name in ("a", "b", "lb"):  # whatever a host left behind, by namespace
            netns.kill_all(self.net.ns(name))
        if self.haproxy is not None:
            if self.haproxy.poll() is None:
                self.haproxy.kill()
            self.haproxy.wait(10)
        for stop in (lambda: self.rabbit and self.rabbit.remove(),
                     lambda: self.redis and self.redis.stop(),
                     lambda: self.pg and (self.pg.stop(fast=True), self.pg.remove())):
            with contextlib.suppress(Exception):
                stop()
        self.net.remove()
        shutil.rmtree(self.admin, ignore_errors=True)


@contextlib.contextmanager
def bed(root: Path, broker: str = "rabbitmq", **kwargs: Any) -> Iterator[Bed]:
    made = Bed(root, broker, **kwargs)
    try:
        made.start_servers()
        yield made
    finally:
        made.close()
