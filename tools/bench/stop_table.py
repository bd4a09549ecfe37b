"""A row per (manager, stop command, set) and their markdown table (pure; tests/unit/test_stop_table.py).

Columns (what tools/bench/deploy_stops.py and tools/bench/platform_stops.py measure):

- stop s: from the stop command (or the platform's first signal) to the last process of the set gone;
  ``never`` when some were still running once the manager counted the set stopped (see "left").
- lost or late: jobs accepted before or during the stop (6 long ones and every echo job answered 202)
  not ``succeeded`` 60 s after the set was started again on the same data, "of" how many.
- 5xx, reset/cut: answers to the request stream (tests/workload.py) that were server errors, or
  connections accepted and then closed without a whole answer. ``refused`` is not counted there.
- refused in 3 s: requests to /healthz (one every 50 ms, a new connection each) in flight at some time
  in the first 3 s after the stop signal that were refused, reset or never answered (5 s), of those:
  what a load balancer that has not
  noticed the stop yet would get. It counts in "clean" only under Kubernetes (its endpoints keep
  routing for a few seconds after SIGTERM); under the other managers a stop is downtime.
- SIGKILL: processes that died of a SIGKILL (the manager's, the kernel's when a container's PID 1
  exits, or the measurement's for what was left); for honcho and foreman, which print one line for
  a SIGKILL round, ``yes``/``0``.
- load: the 1-minute load average just after the stop (the machine has 2 cores, shared).
- left: processes still running after the manager's stop was over (the bench then kills them by pid,
  before the restart: a leftover holding the web port or the Redis port would stop it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

WINDOW = 3.0  # seconds after the stop signal in which the "refused" column counts


@dataclass
class Row:
    manager: str
    stop: str  # the stop command or the platform's way
    kind: str  # "project" or "reference"
    stop_s: float | None = None
    lost: int | None = None
    accepted: int | None = None
    server_errors: int | None = None
    dropped: int | None = None
    refused: int | None = None
    sent: int | None = None
    sigkills: int | str | None = None
    left: int | None = None
    traffic_arrives: bool = False  # a load balancer still routes here after the signal (Kubernetes)
    load: float | None = None  # 1-minute load average just after the stop (2 cores, shared)
    cannot: str = ""  # "cannot run: why" (this set under this manager), or "not measured: why"
    note: str = ""

    @property
    def clean(self) -> bool | None:
        """Stopped right: nothing lost, no 5xx or cut answer, no SIGKILL, nothing left, and, where a
        load balancer still sends traffic after the signal (Kubernetes), none of it refused. Elsewhere
        the manager's stop is downtime anyway: refusing at once is right. None when not measured."""
        if self.cannot or self.lost is None:
            return None
        refused = bool(self.refused) and self.traffic_arrives
        return (self.lost == 0 and not self.server_errors and not self.dropped and not refused
                and self.sigkills in (0, "0") and self.left == 0)


HEADER = ["manager", "stop", "set", "stop s", "lost or late", "5xx", "reset/cut",
          f"refused in {WINDOW:g} s", "SIGKILL", "left", "load", "clean"]


def _num(value: object) -> str:
    return "?" if value is None else str(value)


def cells(row: Row) -> list[str]:
    head = [row.manager, row.stop, row.kind]
    if row.cannot:
        return [*head, row.cannot, *[""] * (len(HEADER) - 5), "-"]
    if row.stop_s is None:
        stop = "?"
    elif row.left:
        stop = "never"
    else:
        stop = f"{row.stop_s:.1f}"
    lost = f"{_num(row.lost)} of {_num(row.accepted)}"
    refused = f"{_num(row.refused)} of {_num(row.sent)}" if row.sent is not None else "?"
    clean = {True: "yes", False: "**no**", None: "?"}[row.clean]
    return [*head, stop, lost, _num(row.server_errors), _num(row.dropped), refused, _num(row.sigkills),
            _num(row.left), "?" if row.load is None else f"{row.load:.1f}", clean]


def render(rows: Iterable[Row]) -> str:
    """The markdown table in the order given, then the numbered notes (each distinct one once)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(HEADER) - 4))
             + "|---|"]
    notes: list[str] = []
    for row in rows:
        out = cells(row)
        if row.note:
            if row.note not in notes:  # the same note (another run of the same row) keeps its number
                notes.append(row.note)
            out[2] += f" ({notes.index(row.note) + 1})"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in out) + " |")
    if notes:
        lines.append("")
        lines += [f"({i}) {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def error_row(manager: str, stop: str, kind: str, error: BaseException) -> Row:
    """A row that could not be measured says why (its first line), never a number."""
    first = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
    return Row(manager, stop, kind, cannot=f"not measured: {first[:160]}")


def ordered(rows: list[Row]) -> list[Row]:
    """Rows of several runs (e.g. one per set) in table order: by manager, by stop command in the order
    first seen, this set before the reference, runs of the same row in the order given."""
    managers: dict[str, int] = {}
    stops: dict[tuple[str, str], int] = {}
    for r in rows:
        managers.setdefault(r.manager, len(managers))
        stops.setdefault((r.manager, r.stop), len(stops))
    return sorted(rows, key=lambda r: (managers[r.manager], stops[(r.manager, r.stop)], r.kind != "project"))
