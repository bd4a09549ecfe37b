"""tools/bench/stop_table.py, stop_sets.py: a row's verdict, the markdown table, the traffic window."""

from __future__ import annotations

from tools.bench.stop_sets import window_counts
from tools.bench.stop_table import HEADER, Row, cells, error_row, ordered, render


def measured(**changes: object) -> Row:
    base = {"stop_s": 3.46, "lost": 0, "accepted": 20, "server_errors": 0, "dropped": 0, "refused": 0,
            "sent": 58, "sigkills": 0, "left": 0, "traffic_arrives": True}
    return Row("kubernetes", "pod deleted", "project", **{**base, **changes})  # type: ignore[arg-type]


def test_a_row_is_clean_only_when_every_count_is_zero() -> None:
    assert measured().clean is True
    for field, value in [("lost", 1), ("server_errors", 2), ("dropped", 1), ("refused", 5), ("sigkills", 3),
                         ("sigkills", "yes"), ("left", 12)]:
        assert measured(**{field: value}).clean is False, field


def test_refused_requests_count_only_where_traffic_still_arrives() -> None:
    assert measured(refused=40, traffic_arrives=False).clean is True  # supervisord, honcho: downtime anyway
    assert measured(refused=40, traffic_arrives=True).clean is False  # kubernetes: the endpoints still route
    assert measured(refused=40, traffic_arrives=False, left=1).clean is False


def test_a_row_not_measured_has_no_verdict() -> None:
    assert Row("docker", "docker stop", "reference", cannot="cannot run: no PID namespace").clean is None
    assert measured(lost=None).clean is None


def test_cells_show_counts_of_their_totals_and_never_for_leftovers() -> None:
    out = cells(measured(lost=3, refused=7, left=0))
    assert out[:4] == ["kubernetes", "pod deleted", "project", "3.5"]
    assert out[4] == "3 of 20" and out[7] == "7 of 58" and out[-1] == "**no**"
    assert len(out) == len(HEADER)
    left = cells(measured(stop_s=30.0, left=12))
    assert left[3] == "never" and left[9] == "12" and left[10] == "?"  # load not read
    assert cells(measured(load=2.345))[10] == "2.3"


def test_render_numbers_notes_and_keeps_every_row_the_header_width() -> None:
    rows = [measured(note="deploy/kubernetes.yaml, SHUTDOWN_DRAIN_SECONDS=5"),
            Row("docker", "docker stop", "reference", cannot="cannot run: x | y"),
            measured(note="second note"), measured(note="second note")]
    text = render(rows)
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    widths = {line.replace("\\|", "").count("|") for line in table}
    assert widths == {len(HEADER) + 1}, table  # an escaped | in a cell does not add a column
    assert "project (1)" in table[2] and "project (2)" in table[4] and "project (2)" in table[5]
    assert lines[-2:] == ["(1) deploy/kubernetes.yaml, SHUTDOWN_DRAIN_SECONDS=5", "(2) second note"]


def test_an_error_row_says_why_in_the_table_not_a_number() -> None:
    row = error_row("supervisord", "supervisorctl stop all", "reference",
                    AssertionError("not all RUNNING within 60 s: {'ref:redis-1': 'FATAL'}\nlog..."))
    assert row.clean is None
    out = cells(row)
    assert out[3].startswith("not measured: not all RUNNING") and "log" not in out[3]
    assert out[-1] == "-"


def test_the_window_counts_requests_in_flight_at_the_signal_and_begun_before_its_end() -> None:
    t0 = 100.0
    results = [(98.0, 98.1, "200"),     # over before the signal: not counted
               (99.9, 104.9, "timeout"),  # in flight at the signal, never answered: counted
               (100.5, 100.6, "refused"), (101.0, 101.1, "200"),
               (102.9, 103.5, "reset"),   # begun in the window, cut after it: counted
               (103.0, 103.1, "refused")]  # begun when the window was over: not counted
    assert window_counts(results, t0, t0 + 3) == (3, 4)
    assert window_counts([], t0, t0 + 3) == (0, 0)


def test_rows_of_two_runs_are_ordered_by_manager_and_stop_this_set_first() -> None:
    def r(manager: str, stop: str, kind: str, lost: int) -> Row:
        return Row(manager, stop, kind, lost=lost)

    project = [r("supervisord", "stop all", "project", 0), r("docker", "docker stop", "project", 0)]
    reference = [r("supervisord", "stop all", "reference", 1), r("supervisord", "stop all", "reference", 2),
                 r("docker", "docker stop", "reference", 3), r("systemd", "KillMode=process", "reference", 4)]
    out = [(x.manager, x.kind, x.lost) for x in ordered(project + reference)]
    assert out == [("supervisord", "project", 0), ("supervisord", "reference", 1),
                   ("supervisord", "reference", 2), ("docker", "project", 0), ("docker", "reference", 3),
                   ("systemd", "reference", 4)]
