"""honcho in a pseudo-terminal: the one driver of ``scripts/shutdown-report``, the tests and the bench.

A program (by default ``honcho start``) runs in its own session with a pty as
its controlling terminal, as in a user's terminal window: ``^C`` written to
the pty's master makes the line discipline send SIGINT to the terminal's
foreground process group (honcho's, with every program it started), which
is the Ctrl+C this project is about. With ``terminal=False`` it runs as a
service manager, CI or ``nohup`` run it: a session of its own with no
controlling terminal, stdin ``/dev/null``, its output to a file (read back
as it grows). A thread reads the output; each line
is kept with the time it was read, cleaned of colours, carriage returns and
the tty's echoed ``^C``, and honcho's own ``system`` lines (``started``,
``sending SIGTERM``, ``stopped (rc=N)``, ``SIGINT received``) are parsed.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
HONCHO_PREFIX = re.compile(r"^\d\d:\d\d:\d\d (?P<name>\S+)\s*\| ?(?P<text>.*)$")
STARTED = re.compile(r"^(?P<name>[\w.-]+) started \(pid=(?P<pid>\d+)\)$")
SENDING = re.compile(r"^sending (?P<sig>SIG[A-Z0-9]+) to (?P<name>[\w.-]+) \(pid (?P<pid>\d+)\)$")
STOPPED = re.compile(r"^(?P<name>[\w.-]+) stopped \(rc=(?P<rc>-?\d+|None)\)$")
RECEIVED = re.compile(r"^(?P<sig>SIG[A-Z0-9]+) received$")


@dataclass(frozen=True)
class HonchoEvent:
    kind: str  # "started", "sending", "stopped" or "received"
    name: str = ""  # honcho's process name, e.g. "web.1"
    pid: int | None = None
    rc: int | None = None
    signal: str = ""  # "SIGTERM", "SIGKILL", "SIGINT"


def clean_line(line: str) -> str:
    """A line of terminal output without colours, CR, or the tty's echoed ``^C``."""
    line = ANSI.sub("", line).replace("\r", "")
    while line.startswith("^C"):
        line = line[2:]
    return line


def split_line(line: str) -> tuple[str, str] | None:
    """``HH:MM:SS name.1 | text`` as (name, text); None for a line not in honcho's form."""
    m = HONCHO_PREFIX.match(line)
    return (m["name"], m["text"]) if m else None


def parse_honcho_line(line: str) -> HonchoEvent | None:
    """honcho's own ``system`` lines as events; anything else (a program's output) is None.

    Accepts the full ``HH:MM:SS system | text`` form or the bare text.
    """
    line = clean_line(line).strip()
    m = HONCHO_PREFIX.match(line)
    if m:
        if m["name"] != "system":
            return None
        line = m["text"].strip()
    if m := STARTED.match(line):
        return HonchoEvent("started", m["name"], pid=int(m["pid"]))
    if m := SENDING.match(line):
        return HonchoEvent("sending", m["name"], pid=int(m["pid"]), signal=m["sig"])
    if m := STOPPED.match(line):
        rc = None if m["rc"] == "None" else int(m["rc"])
        return HonchoEvent("stopped", m["name"], rc=rc)
    if m := RECEIVED.match(line):
        return HonchoEvent("received", signal=m["sig"])
    return None


def controlling_tty() -> None:
    """In the child (preexec): the pty becomes its terminal, with a fresh terminal's signal dispositions.

    Ignored signals survive exec: started from ``nohup`` or a script's
    background job, honcho and every program would inherit SIGHUP or SIGINT
    ignored, and what is observed would be nohup's doing, not the set's.
    """
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _default_stop_signals() -> None:
    """preexec, no terminal: the stop signals at their defaults (as :func:`controlling_tty` does)."""
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)


def honcho_command(procfile: Path | None = None, directory: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "honcho", "start", "--no-colour"]
    if procfile is not None:
        command += ["-f", str(procfile), "-d", str(directory or procfile.parent)]
    return command


class Honcho:
    """One start of a program in a pty: its process, its output, ``^C`` and signals.

    ``command`` defaults to ``honcho start`` (with ``procfile``); ``env`` to
    this process's environment. ``verbose`` echoes each line to stderr,
    ``log`` writes it to a file. ``terminal=False``: no terminal (no ``^C``),
    the output goes to the file ``output`` (default: a new temporary file).
    """

    def __init__(self, cwd: Path, procfile: Path | None = None, *, command: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None, verbose: bool = False,
                 log: Path | None = None, terminal: bool = True, output: Path | None = None) -> None:
        self.cwd = cwd
        self.command = list(command) if command else honcho_command(procfile, cwd if procfile else None)
        self.env = dict(env) if env is not None else None
        self.verbose = verbose
        self.log: IO[str] | None = open(log, "w", encoding="utf-8") if log else None  # noqa: SIM115
        self.lines: list[tuple[float, str]] = []  # (monotonic time read, cleaned line)
        self.events: list[tuple[float, HonchoEvent]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.master: int | None = None  # the pty's master side; with no terminal, the output file's reader
        self.terminal = terminal
        self.output_file = output
        self.exit_at: float | None = None  # monotonic, as first seen by poll()
        self._partial = ""
        self._lock = threading.Lock()  # lines, events, partial, log
        self._fd_lock = threading.Lock()  # the master fd: never read once closed (its number is reused)
        self._reader: threading.Thread | None = None

    # -- the process ---------------------------------------------------------------------------
    def start(self) -> None:
        if not self.terminal:
            self._start_detached()
            return
        master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdin=slave, stdout=slave,
                                         stderr=slave, start_new_session=True, preexec_fn=controlling_tty,
                                         close_fds=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = master
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True,
                                        name=f"pty-reader-{self.proc.pid}")
        self._reader.start()

    def _start_detached(self) -> None:
        """No controlling terminal: a session of its own, stdin ``/dev/null``, stdout and stderr a file."""
        if self.output_file is None:
            fd, name = tempfile.mkstemp(prefix="honcho-", suffix=".log")
            os.close(fd)
            self.output_file = Path(name)
        path = self.output_file
        with open(path, "wb") as out:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_default_stop_signals, close_fds=True)
        self.master = os.open(path, os.O_RDONLY)
        self._reader = threading.Thread(target=self._read, args=(self.master,), daemon=True,
                                        name=f"output-reader-{self.proc.pid}")
        self._reader.start()

    def foreground(self) -> int:
        """The terminal's foreground process group (the group a ``^C`` reaches)."""
        assert self.terminal and self.master is not None
        return os.tcgetpgrp(self.master)

    def ctrl_c(self) -> None:
        """Type ^C into the terminal: the tty sends SIGINT to its foreground process group."""
        assert self.terminal, "no terminal to type ^C into"
        with self._fd_lock:
            assert self.master is not None, "the terminal is closed"
            os.write(self.master, b"\x03")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def poll(self) -> int | None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None and self.exit_at is None:
            self.exit_at = time.monotonic()
        return rc

    def wait(self, timeout: float) -> int | None:
        """The exit code, polled every 10 ms (so ``exit_at`` is close); None if still running."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.poll()
            if rc is not None:
                return rc
            time.sleep(0.01)
        return self.poll()

    def join_reader(self, timeout: float) -> None:
        """Wait for the output to end (every holder of the terminal closed it), at most ``timeout``."""
        if self._reader is not None:
            self._reader.join(timeout)

    def close_pty(self) -> None:
        """Close the terminal's master side: the reader stops, programs still on it get a hang-up."""
        with self._fd_lock:
            if self.master is not None:
                os.close(self.master)
                self.master = None

    def close(self) -> None:
        self.join_reader(0.5)
        self.close_pty()
        with self._lock:
            if self.log:
                self.log.close()
                self.log = None

    # -- the output ----------------------------------------------------------------------------
    def _read(self, fd: int) -> None:
        try:
            while True:
                try:
                    ready, _, _ = select.select([fd], [], [], 0.1)
                except (OSError, ValueError):
                    break
                with self._fd_lock:
                    if self.master != fd:
                        break  # closed by close_pty(): the number may be another file's now
                    if not ready:
                        continue
                    ended = not self.terminal and self.proc is not None and self.proc.poll() is not None
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:  # EIO: every holder of the slave side closed it
                        break
                if not chunk and not self.terminal and not ended:  # a file, at its end for now
                    time.sleep(0.05)
                    continue
                if not chunk:
                    break
                now = time.monotonic()
                with self._lock:
                    text = self._partial + chunk.decode(errors="replace")
                    *complete, self._partial = text.split("\n")
                    for raw in complete:
                        self._line(now, raw)
        finally:
            with self._lock:
                if self._partial:
                    self._line(time.monotonic(), self._partial)
                    self._partial = ""

    def _line(self, now: float, raw: str) -> None:
        line = clean_line(raw)
        self.lines.append((now, line))
        event = parse_honcho_line(line)
        if event is not None:
            self.events.append((now, event))
        if self.verbose:
            print(line, file=sys.stderr, flush=True)
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    @property
    def output(self) -> str:
        """Everything printed so far, with the line being written."""
        with self._lock:
            return "\n".join([line for _, line in self.lines] + ([self._partial] if self._partial else []))

    def all_lines(self) -> list[str]:
        with self._lock:
            return [line for _, line in self.lines]

    def texts(self, name: str | None = None) -> list[str]:
        """The text of honcho's ``HH:MM:SS name.N | text`` lines: all, a process's or a type's.

        ``name``: a process (``web.1``) or a type (``web``, every ``web.N``).
        """
        out = []
        for line in self.all_lines():
            parsed = split_line(line)
            if parsed and (name is None or parsed[0] == name or parsed[0].split(".")[0] == name):
                out.append(parsed[1])
        return out

    def events_of(self, kind: str) -> list[tuple[float, HonchoEvent]]:
        with self._lock:
            return [(t, e) for t, e in self.events if e.kind == kind]

    def tail(self, n: int = 20, name: str | None = None) -> list[str]:
        """The last n lines of output, or of one process's output (honcho's name, e.g. ``web.1``)."""
        lines = self.all_lines()
        if name is not None:
            lines = [line for line in lines if (p := split_line(line)) and p[0] == name]
        return lines[-n:]
