"""Pure helpers shared by the shutdown reports: Procfiles, wait statuses, signals, plain-text tables.

Shared so the honcho report (tools.stopcheck.analysis, tools.stopcheck.render) and the
managers' simulation (tools.stopcheck.managers, tools.stopcheck.report) describe a stop
the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterable, Sequence
from typing import Any

PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")  # honcho.environ's own pattern
PYTHON = re.compile(r"^python[0-9.]*$")


def parse_procfile(text: str) -> list[tuple[str, str]]:
    """(name, command) for each entry, as honcho reads them (lines it cannot parse are skipped)."""
    entries = []
    for line in text.splitlines():
        m = PROCFILE_LINE.match(line)
        if m and m.group(1) not in {n for n, _ in entries}:
            entries.append((m.group(1), m.group(2)))
    return entries


def decode_wait_status(status: int) -> tuple[int | None, int | None]:
    """(exit code, None) for a normal exit, (None, signal number) for a death by signal."""
    termsig = status & 0x7F
    if termsig == 0:
        return (status >> 8) & 0xFF, None
    return None, termsig


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def signal_number(name: str) -> int:
    return int(signal.Signals[name])


def parse_status_masks(text: str) -> dict[str, int]:
    """The signal masks of /proc/PID/status (``SigIgn``, ``SigCgt``, ``SigBlk``, ...) as integers."""
    masks = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Sig") or key.startswith("Shd"):
            with contextlib.suppress(ValueError):
                masks[key] = int(value.strip(), 16)
    return masks


def disposition(ignored: int | None, caught: int | None, signum: int) -> str:
    """What a process does with ``signum``: "ignored", "handled", "default action" or "?"."""
    if ignored is None or caught is None:
        return "?"
    bit = 1 << (signum - 1)
    if ignored & bit:
        return "ignored"
    if caught & bit:
        return "handled"
    return "default action"


def describe_exit(code: int | None, termsig: int | None) -> str:
    """``0``, ``1``, ``SIGKILL`` (died of that signal) or ``?``."""
    if termsig is not None:
        return signal_name(termsig)
    if code is not None:
        return str(code)
    return "?"


def describe_signals(received: Sequence[tuple[str, str]]) -> str:
    """[("SIGTERM", "handled"), ("SIGTERM", "handled")] -> "SIGTERM x2 (handled)"."""
    if not received:
        return "none directly"
    groups: list[list[Any]] = []
    for name, disp in received:
        if groups and groups[-1][0] == name and groups[-1][1] == disp:
            groups[-1][2] += 1
        else:
            groups.append([name, disp, 1])
    return ", ".join(f"{n}{f' x{c}' if c > 1 else ''} ({d})" for n, d, c in groups)


def short_command(argv: Sequence[str], limit: int = 40) -> str:
    """A command line shortened for a table: paths to their last part, at most ``limit`` characters."""
    if not argv:
        return "?"
    head, sep, rest = argv[0].partition(" ")  # a process title may be one string with spaces
    parts = [os.path.basename(head) or head] + ([rest] if sep else [])
    args = list(argv[1:])
    if not sep and PYTHON.match(parts[0]) and args and args[0].startswith("/"):
        parts = [os.path.basename(args.pop(0))]  # a console script (celery, gunicorn): its name
    for arg in args:
        parts.append(os.path.basename(arg) if arg.startswith("/") and len(arg) > 1 else arg)
    return shorten(" ".join(parts), limit)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """A plain-text table: columns padded to their widest cell, ``right`` ones right-aligned."""
    rows = [list(map(str, r)) for r in rows]
    right = set(right)
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


