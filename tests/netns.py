"""Linux network namespaces for the tests: made, used and removed by name, never an address outside them.

A test's hosts are namespaces joined by bridges that live in a namespace of
their own, so nothing is added to the machine's own network. Names carry the
pid of the test process that made them: :func:`remove_stale` removes what a
killed test run left behind, and nothing of a running one.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")

PREFIX = "srt"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    command = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def exists(ns: str) -> bool:
    return Path("/var/run/netns", ns).exists()


def pids(ns: str) -> list[int]:
    """Every process whose network namespace is ``ns``."""
    if not exists(ns):
        return []
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
    return [int(p) for p in out.split()]


def kill_all(ns: str, signum: int = signal.SIGKILL) -> list[int]:
    """Signal every process in ``ns`` (by pid); the pids signalled."""
    found = pids(ns)
    for pid in found:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return found


def delete(ns: str, timeout: float = 10) -> None:
    """Kill what runs in ``ns``, wait for it to be gone, then delete the namespace (and its links)."""
    deadline = time.monotonic() + timeout
    while kill_all(ns) and time.monotonic() < deadline:
        time.sleep(0.05)
    if exists(ns):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def remove_stale() -> None:
    """Namespaces of test runs that died (the pid in their name is gone): removed."""
    for path in Path("/var/run/netns").glob(f"{PREFIX}*") if Path("/var/run/netns").exists() else []:
        match = re.match(rf"{PREFIX}(\d+)x", path.name)
        if match and not psutil.pid_exists(int(match[1])):
            delete(path.name)


def command(ns: str | None, argv: list[str]) -> list[str]:
    """``argv`` run inside ``ns`` (``ip netns exec`` execs it: its pid is the program's own); None: as is."""
    return argv if ns is None else ["ip", "netns", "exec", ns, *argv]


def run_in(ns: str | None, fn: Callable[[], T], timeout: float = 60) -> T:
    """Call ``fn`` in a fresh thread that lives in ``ns``: its sockets are the namespace's. None: here.

    setns() moves only the calling thread, and that thread ends with ``fn``, so
    no other thread of the test process ever changes namespace.
    """
    if ns is None:
        return fn()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"in-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"call in namespace {ns} did not end within {timeout} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


class Network:
    """The namespaces and bridges of one test bed, named after this process's pid; a bridge per network
    in a namespace of its own (``sw``), so nothing is added to the machine's own network."""

    def __init__(self) -> None:
        remove_stale()
        self.tag = f"{PREFIX}{os.getpid()}x{os.urandom(2).hex()}"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def _add(self, host: str) -> str:
        name = self.ns(host)
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
        self.made.append(name)
        ip("link", "set", "lo", "up", ns=name)
        return name

    def build(self, hosts: dict[str, dict[str, str]]) -> None:
        """``hosts``: each host's address on each network (a bridge each, made here)."""
        sw = self._add("sw")
        for bridge in sorted({net for addresses in hosts.values() for net in addresses}):
            ip("link", "add", bridge, "type", "bridge", ns=sw)
            ip("link", "set", bridge, "up", ns=sw)
        for host, addresses in hosts.items():
            self._attach(host, addresses)

    def _attach(self, host: str, addresses: dict[str, str]) -> None:
        name, sw = self._add(host), self.ns("sw")
        for net, address in addresses.items():
            port, inside = f"{host}-{net[0]}", f"{net}0"
            ip("link", "add", port, "type", "veth", "peer", "name", inside, "netns", name, ns=sw)
            ip("link", "set", port, "master", net, "up", ns=sw)
            ip("addr", "add", f"{address}/24", "dev", inside, ns=name)
            ip("link", "set", inside, "up", ns=name)

    def link(self, host: str, net: str, up: bool) -> None:
        """The host's cable into ``net`` (front or back) plugged in or pulled: packets vanish, no reset."""
        ip("link", "set", f"{host}-{net[0]}", "up" if up else "down", ns=self.ns("sw"))

    def remove(self) -> None:
        for name in reversed(self.made):
            delete(name)
        self.made.clear()
