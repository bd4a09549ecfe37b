"""A throwaway RabbitMQ node for the tests: its own name, ports, epmd, data and log.

RabbitMQ logs every connection, and how each ended: a client that did not
close its AMQP connection shows ``client unexpectedly closed TCP connection``
(:meth:`RabbitMQServer.connections`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import amqp

from tests.netns import command as in_netns
from tests.netns import run_in
from tests.procset import free_port

# -- RabbitMQ --------------------------------------------------------------
# Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the
# rabbitmq user and its fixed directories; the real scripts live here.
RABBITMQ_BIN_DIRS = [Path("/usr/lib/rabbitmq/bin"), *sorted(Path("/usr/lib/rabbitmq/lib").glob("*/sbin"))]
_RABBIT_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\S* "
                           r"\[(?P<level>\w+)\] (?P<by><[\d.]+>) (?P<text>.*)")
_GRANTED = re.compile(r"^connection (?P<pid><[\d.]+>) \([\d.]+:(?P<port>\d+) -> .*\): "
                      r"user '[^']*' authenticated and granted access to vhost '(?P<vhost>[^']*)'")
_CLOSING = re.compile(r"^closing AMQP connection (?P<pid><[\d.]+>) \(")


def find_rabbitmq() -> Path | None:
    for candidate in RABBITMQ_BIN_DIRS:
        if (candidate / "rabbitmq-server").exists() and (candidate / "rabbitmqctl").exists():
            return candidate
    return None


@dataclass
class AmqpConnection:
    """One client connection as RabbitMQ's log tells it."""

    pid: str  # the server's Erlang process for it
    client_port: int
    end: str | None = None  # None while open; "clean", or the server's account of it

    @property
    def clean(self) -> bool:
        return self.end == "clean"


class RabbitMQServer:
    """A private RabbitMQ node: its own name, ports, epmd, data and log, loopback only.

    Runs beside any other node on the machine, as root too. Booting takes a
    few seconds, so the tests share one node and give each test a vhost.
    RabbitMQ logs every connection: ``accepting`` and ``granted access to
    vhost``, then ``closing AMQP connection`` at info level for a client that
    closed with AMQP's handshake, or at warning level followed by the reason
    (``client unexpectedly closed TCP connection``) otherwise.
    """

    def __init__(self, bindir: Path, *, netns: str | None = None, address: str = "127.0.0.1") -> None:
        """``netns``/``address``: the node runs in that network namespace, AMQP on that address."""
        self.bindir = bindir
        self.netns = netns
        self.address = address
        self.root = Path(tempfile.mkdtemp(prefix="rabbitmq-test-"))
        self.port, self.dist_port, self.epmd_port = _distinct_free_ports(3)
        self.node = f"rabbit-test-{self.port}@localhost"
        self.log = self.root / "log" / f"{self.node}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        # guest may log in from other hosts only when told so (RabbitMQ's loopback_users).
        remote = "" if address == "127.0.0.1" else "loopback_users.guest = false\n"
        (self.root / "rabbitmq.conf").write_text(f"log.console = false\nlog.file.level = info\n{remote}")
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")

    def env(self) -> dict[str, str]:
        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        return {
            **os.environ,
            "HOME": str(self.root),  # the Erlang cookie, shared by the node and rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.address,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback,
            "RABBITMQ_CTL_ERL_ARGS": loopback,
        }

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@{self.address}:{self.port}/{vhost}"

    def start(self, timeout: float = 90) -> None:
        """Start the node (again, after :meth:`stop`: same data) and wait until it takes logins."""
        if self.epmd is None:  # our own epmd, in the foreground: stopped by pid, never a daemon left
            epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
            listen = [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"]
            self.epmd = subprocess.Popen(in_netns(self.netns, listen),
                                         env=self.env(), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        with open(self.root / "stdout.log", "ab") as out:
            server = in_netns(self.netns, [str(self.bindir / "rabbitmq-server")])
            self.proc = subprocess.Popen(server, cwd=self.root, env=self.env(), stdout=out, stderr=out,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.answers():
                return
            time.sleep(0.2)
        raise RuntimeError(f"RabbitMQ did not start:\n{(self.root / 'stdout.log').read_text()}")

    def answers(self, vhost: str = "/") -> bool:
        """A login on ``vhost`` works (the connection is closed properly)."""
        def login() -> bool:
            try:
                conn = amqp.Connection(f"{self.address}:{self.port}", virtual_host=vhost, connect_timeout=1)
                conn.connect()
            except Exception:  # noqa: BLE001 - not up (yet)
                return False
            conn.close()
            return True

        return run_in(self.netns, login)

    def stop(self) -> None:
        """Stop the node as its service would (SIGTERM: a clean shutdown); epmd stays."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the node and its helpers
                self.proc.wait(5)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        if self.epmd is not None:
            self.epmd.terminate()
            self.epmd.wait(10)
            self.epmd = None
        shutil.rmtree(self.root, ignore_errors=True)

    def ctl(self, *args: str) -> str:
        ctl = in_netns(self.netns, [str(self.bindir / "rabbitmqctl"), "--node", self.node, *args])
        done = subprocess.run(ctl, env=self.env(), check=True, capture_output=True, text=True, timeout=60)
        return done.stdout

    def add_vhost(self, name: str) -> str:
        """A fresh vhost the guest user may use; its URL."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return self.url(name)

    def queue_depth(self, vhost: str, queue: str) -> int:
        """Messages in ``queue`` (ready and unacked) as RabbitMQ counts them; 0 if it does not exist."""
        listing = self.ctl("list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "messages")
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        return 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def connections(self, vhost: str) -> list[AmqpConnection]:
        """Every client connection to ``vhost`` in the log, in order, with how it ended.

        The log is written asynchronously: a connection may show up a moment
        after it happened. The server's Erlang pids start again at each boot,
        so a connection still open when the node stops ends there.
        """
        found: list[AmqpConnection] = []
        open_now: dict[str, AmqpConnection] = {}
        explaining: dict[str, AmqpConnection] = {}  # "closing ...:" then the reason, on the next line
        for line in self.log_text().splitlines():
            match = _RABBIT_ENTRY.match(line)
            if not match:
                continue
            text = match["text"].strip()
            if match["by"] in explaining:
                conn = explaining.pop(match["by"])
                conn.end = f"{match['level']}: {text}"
            elif (granted := _GRANTED.match(text)) and granted["vhost"] == vhost:
                open_now[granted["pid"]] = AmqpConnection(granted["pid"], int(granted["port"]))
                found.append(open_now[granted["pid"]])
            elif (closing := _CLOSING.match(text)) and closing["pid"] in open_now:
                conn = open_now.pop(closing["pid"])
                conn.end = "clean" if match["level"] == "info" and not text.endswith(":") else text
                if text.endswith(":"):
                    explaining[closing["pid"]] = conn
            elif text.startswith("Starting RabbitMQ "):  # a new boot: whatever was open ended with the node
                for conn in open_now.values():
                    conn.end = "node stopped"
                open_now.clear()
        return found


@dataclass
class Vhost:
    """A vhost of a :class:`RabbitMQServer` node, for one test."""

    node: RabbitMQServer
    name: str
    url: str


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)
