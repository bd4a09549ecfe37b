"""Several hosts on one machine: the set on hosts ``a`` and ``b`` behind a balancer, one database and broker.

Hosts are network namespaces: ``lb`` (HAProxy or nginx, tests/balancers.py, and the clients), ``db``
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
import http.client
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy

from tests import netns
from tests.balancers import FRONT, HOST_NUMBERS, LB_ADDRESS, LB_PORT, WEB_PORT, HAProxy, Nginx
from tests.hostruns import FINISHED, Run, now_clock, runs_in
from tests.procset import ROOT
from tests.rabbitmq_node import RabbitMQServer, find_rabbitmq
from tests.servers import PostgresServer, RedisServer, find_pg_bin
from tools.stopcheck.honcho import Honcho, honcho_command

BACK = "10.231.2."
DB_ADDRESS = BACK + "10"

#: The settings every host runs with here (a user's several-host set, made quick to fail over).
HOST_ENV = {
    "SHUTDOWN_DRAIN_SECONDS": "3",  # deploy/haproxy.cfg's rule
    "SHUTDOWN_GRACE_SECONDS": "3",
    "WORKER_CONCURRENCY": "24",  # either host alone carries the clients, as a rolling restart needs
    "WEB_THREADS": "24",
    "JOB_LEASE_SECONDS": "6",
    # A lost host's taken, unstarted messages (Redis: unacked for kombu's 1 h) wait for this.
    "JOB_QUEUED_LEASE_SECONDS": "20",
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
        again, back in rotation. The seconds the stop and the return took."""
        began = time.monotonic()
        self.stop(timeout=timeout)
        stopped = (self.terminal.exit_at or time.monotonic()) - began
        self.bed.wait_in_balancer(self.name, up=False, timeout=10)  # a quick stop: the balancer may lag
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


class Bed:
    """The whole test bed; :meth:`close` removes everything it started.

    ``procfile``, ``directory`` and ``host_env`` run another set on the hosts (the bench's
    reference); ``balancer`` is "haproxy" (checking ``check``, its optional retry lines on with
    ``retries``) or "nginx" (``check``: what its operator polls; tests/balancers.py); the
    defaults are this set's, as deploy/ ships.
    """

    def __init__(self, root: Path, broker: str = "rabbitmq", *, procfile: Path | None = None,
                 directory: Path | None = None, host_env: dict[str, str] | None = None,
                 balancer: str = "haproxy", check: str = "/readyz", retries: bool = False) -> None:
        self.root = root
        self.broker_kind = broker
        self.procfile, self.directory, self.host_env = procfile, directory, host_env
        self.net = netns.Network()
        self.balancer = (HAProxy(self.net, root, check, retries) if balancer == "haproxy"
                         else Nginx(self.net, root, check))
        self.pg: PostgresServer | None = None
        self.rabbit: RabbitMQServer | None = None
        self.redis: RedisServer | None = None
        self.hosts: dict[str, HostSet] = {}

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
        self.balancer.start()

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

    def start_host(self, name: str, **extra: str) -> HostSet:
        host = self.hosts.get(name) or HostSet(self, name, self.env(**extra), self.procfile, self.directory)
        self.hosts[name] = host
        host.start()
        return host

    # -- look ----------------------------------------------------------------------------------
    def wait_in_balancer(self, name: str, up: bool = True, timeout: float = 90) -> float:
        """Wait until the balancer has ``name`` in rotation (or out of it); the seconds waited."""
        try:
            return self.balancer.wait_in(name, up, timeout)
        except AssertionError as failed:
            told = self.hosts[name].lines("system") + self.hosts[name].terminal.tail(40)
            raise AssertionError(f"{failed}\n" + "\n".join(told)) from None

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
        with contextlib.suppress(Exception):
            self.balancer.close()
        for stop in (lambda: self.rabbit and self.rabbit.remove(),
                     lambda: self.redis and self.redis.stop(),
                     lambda: self.pg and (self.pg.stop(fast=True), self.pg.remove())):
            with contextlib.suppress(Exception):
                stop()
        self.net.remove()


@contextlib.contextmanager
def bed(root: Path, broker: str = "rabbitmq", **kwargs: Any) -> Iterator[Bed]:
    made = Bed(root, broker, **kwargs)
    try:
        made.start_servers()
        yield made
    finally:
        made.close()
