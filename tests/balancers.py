"""The several-host bed's load balancer (tests/hosts.py): HAProxy or nginx, from deploy/ as shipped.

Each runs in the bed's ``lb`` namespace with the file from deploy/, only the
server lines and the listening address swapped in. HAProxy checks /readyz and
says through its stats socket whether a host is in rotation; open-source nginx
cannot tell (no active checks), so "in rotation" is what docs/several-hosts.md
tells its users to wait for: the host's /readyz answering 200.
"""

from __future__ import annotations

import csv
import http.client
import io
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests import netns
from tests.procset import ROOT

FRONT = "10.231.1."
LB_ADDRESS = FRONT + "1"
LB_PORT = 8080
WEB_PORT = 8000
HOST_NUMBERS = {"a": 11, "b": 12}
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
NGINX_CONF = ROOT / "deploy" / "nginx-upstream.conf"


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


def nginx_config(root: Path) -> str:
    """A whole nginx.conf around deploy/nginx-upstream.conf as shipped, pointed at the bed's hosts;
    everything nginx writes stays under ``root``."""
    text = NGINX_CONF.read_text()
    text = re.sub(r"(?m)^(\s*)listen \S+;", rf"\1listen {LB_ADDRESS}:{LB_PORT};", text, count=1)
    first = re.search(r"(?m)^(\s*)server \S+:\d+( [^;]*)?;\n", text)
    assert first is not None, text
    servers = "".join(f"{first[1]}server {FRONT}{n}:{WEB_PORT}{first[2] or ''};\n"
                      for n in HOST_NUMBERS.values())
    text = text[:first.start()] + servers + text[first.end():]
    text = re.sub(r"(?m)^\s*server (?!10\.231\.)\S+:\d+.*;\n", "", text)
    temp = "\n".join(f"    {kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                        "uwsgi", "scgi"))
    return (f"daemon off;\nuser root;\nworker_processes 1;\npid {root}/nginx.pid;\n"
            f"error_log {root}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n    access_log off;\n{temp}\n{text}}}\n")


def _get(address: str, port: int, path: str) -> int | None:
    """One GET; its status, or None if nothing answered."""
    conn = http.client.HTTPConnection(address, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def _nginx_listening() -> bool:
    try:
        socket.create_connection((LB_ADDRESS, LB_PORT), timeout=1).close()
    except OSError:
        return False
    return True


class Balancer:
    """A balancer in the ``lb`` namespace: started from its file, asked whether a host is in rotation."""

    name = ""

    def __init__(self, net: netns.Network, root: Path) -> None:
        self.net, self.root = net, root
        self.proc: subprocess.Popen[bytes] | None = None

    def _run(self, argv: list[str], log_name: str, started: Callable[[], bool]) -> None:
        log = open(self.root / log_name, "wb")  # noqa: SIM115 - the balancer keeps its copy
        self.proc = subprocess.Popen(netns.command(self.net.ns("lb"), argv), stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while not started():
            assert time.monotonic() < deadline and self.proc.poll() is None, \
                f"{self.name} did not start:\n" + (self.root / log_name).read_text()
            time.sleep(0.05)

    def in_rotation(self, host: str) -> bool:
        raise NotImplementedError

    def wait_in(self, host: str, up: bool = True, timeout: float = 90) -> float:
        """Wait until ``host`` is in rotation (or out of it); the seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.in_rotation(host) == up:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"host {host} not {'in' if up else 'out of'} rotation in {self.name} within "
                             f"{timeout} s")

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)


class HAProxy(Balancer):
    """deploy/haproxy.cfg: checks ``check``; ``retries``: its optional retry lines on."""

    name = "HAProxy"

    def __init__(self, net: netns.Network, root: Path, check: str = "/readyz", retries: bool = False) -> None:
        super().__init__(net, root)
        self.check, self.retries = check, retries
        self.admin = Path(tempfile.mkdtemp(prefix="haproxy-")) / "admin.sock"  # short: a socket's name

    def start(self) -> None:
        config = self.root / "haproxy.cfg"
        config.write_text(haproxy_config(self.admin, self.check, retries=self.retries))
        check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self._run(["haproxy", "-db", "-f", str(config)], "haproxy.log", started=self.admin.exists)

    def admin_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """HAProxy's view of each host: UP, DOWN, MAINT ... (``show stat``)."""
        text = self.admin_command("show stat").lstrip("# ")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row["svname"] in HOST_NUMBERS}

    def in_rotation(self, host: str) -> bool:
        return self.server_states().get(host, "").startswith("UP")

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.admin.parent, ignore_errors=True)


class Nginx(Balancer):
    """deploy/nginx-upstream.conf (open-source nginx: passive checks only); ``check``: the path its
    operator polls on a restarted host before the next one."""

    name = "nginx"

    def __init__(self, net: netns.Network, root: Path, check: str = "/readyz") -> None:
        super().__init__(net, root)
        self.check = check

    def start(self) -> None:
        (self.root / "nginx").mkdir(exist_ok=True)
        config = self.root / "nginx" / "nginx.conf"
        config.write_text(nginx_config(config.parent))
        argv = ["nginx", "-p", str(config.parent), "-c", str(config), "-e", str(config.parent / "error.log")]
        lb = self.net.ns("lb")  # its listening address is there
        check = subprocess.run(netns.command(lb, [*argv, "-t"]), capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # Started once it listens: a request would mark the hosts, not yet up, failed.
        self._run(argv, "nginx.log", started=lambda: netns.run_in(lb, _nginx_listening))

    def in_rotation(self, host: str) -> bool:
        """What nginx cannot tell; what its users wait for: the host's check answering 200."""
        address = f"{FRONT}{HOST_NUMBERS[host]}"
        return netns.run_in(self.net.ns("lb"), lambda: _get(address, WEB_PORT, self.check)) == 200
