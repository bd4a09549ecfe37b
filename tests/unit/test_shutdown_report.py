"""scripts/shutdown-report's pure parts: honcho's lines, wait statuses, /proc masks, events, the table."""

from __future__ import annotations

import os
import signal
import struct

import pytest

from tools.stopcheck.analysis import rc_to_wait_status
from tools.stopcheck.cli import parse_args
from tools.stopcheck.connector import parse_proc_events
from tools.stopcheck.honcho import HonchoEvent, parse_honcho_line
from tools.stopcheck.proctrack import read_masks, read_stat
from tools.stopcheck.render import sigkilled_by
from tools.stopcheck.text import (
    decode_wait_status,
    describe_exit,
    describe_signals,
    disposition,
    format_table,
    parse_procfile,
    parse_status_masks,
    short_command,
)

# -- honcho's lines -------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ("16:56:00 system   | worker.1 started (pid=27975)", HonchoEvent("started", "worker.1", pid=27975)),
    ("web.1 started (pid=12)", HonchoEvent("started", "web.1", pid=12)),
    ("16:56:01 system   | sending SIGTERM to web.1 (pid 27973)",
     HonchoEvent("sending", "web.1", pid=27973, signal="SIGTERM")),
    ("sending SIGKILL to my-entry_2.1 (pid 5)",
     HonchoEvent("sending", "my-entry_2.1", pid=5, signal="SIGKILL")),
    ("16:56:01 system | broker.1 stopped (rc=-15)", HonchoEvent("stopped", "broker.1", rc=-15)),
    ("beat.1 stopped (rc=0)", HonchoEvent("stopped", "beat.1", rc=0)),
    ("^C16:56:01 system   | SIGINT received", HonchoEvent("received", signal="SIGINT")),
    ("SIGTERM received\r", HonchoEvent("received", signal="SIGTERM")),
    ("\x1b[0m\x1b[36m16:56:00 system | web.1 started (pid=7)\x1b[0m",
     HonchoEvent("started", "web.1", pid=7)),
])
def test_honcho_lines_are_parsed(line: str, expected: object) -> None:
    assert parse_honcho_line(line) == expected


@pytest.mark.parametrize("line", [
    "16:56:01 web.1    | web.1 started (pid=3)",  # a program printing honcho-like text
    "16:56:01 worker.1 | sending SIGTERM to x.1 (pid 4)",
    "started (pid=3)",
    "web.1 stopped",
    "",
    "16:56:01 system   | something else",
])
def test_other_lines_are_not_events(line: str) -> None:
    assert parse_honcho_line(line) is None


def test_procfile_is_read_like_honcho() -> None:
    text = "# comment\nweb: exec gunicorn app:app\n\nbad line\nworker:celery -A t worker\nweb: duplicate\n"
    assert parse_procfile(text) == [("web", "exec gunicorn app:app"), ("worker", "celery -A t worker")]


# -- statuses, masks, events -----------------------------------------------------


@pytest.mark.parametrize("status, expected", [
    (0, (0, None)),
    (7 << 8, (7, None)),
    (255 << 8, (255, None)),
    (9, (None, 9)),
    (15, (None, 15)),
    (0x80 | 11, (None, 11)),  # SIGSEGV with a core dump
])
def test_wait_status_is_decoded(status: int, expected: tuple[int | None, int | None]) -> None:
    assert decode_wait_status(status) == expected
    code, sig = expected
    assert describe_exit(code, sig) == (signal.Signals(sig).name if sig else str(code))


def test_wait_status_matches_os_decoding() -> None:
    for status in (0, 3 << 8, 9, 15 | 0x80):
        code, sig = decode_wait_status(status)
        if os.WIFEXITED(status):
            assert code == os.WEXITSTATUS(status) and sig is None
        else:
            assert sig == os.WTERMSIG(status) and code is None


def test_unknown_exit_is_a_question_mark() -> None:
    assert describe_exit(None, None) == "?"


STATUS = """Name:\tpython3
SigQ:\t0/96365
SigPnd:\t0000000000000000
ShdPnd:\t0000000000000000
SigBlk:\t0000000000000000
SigIgn:\t0000000001001000
SigCgt:\t0000000180004002
CapInh:\t0000000000000000
"""


def test_status_masks_decode_to_dispositions() -> None:
    masks = parse_status_masks(STATUS)
    assert masks["SigIgn"] == 0x1001000 and masks["SigCgt"] == 0x180004002 and masks["SigBlk"] == 0
    ign, cgt = masks["SigIgn"], masks["SigCgt"]
    assert disposition(ign, cgt, signal.SIGPIPE) == "ignored"  # bit 12
    assert disposition(ign, cgt, signal.SIGTERM) == "handled"  # bit 14
    assert disposition(ign, cgt, signal.SIGINT) == "handled"  # bit 1
    assert disposition(ign, cgt, signal.SIGUSR1) == "default action"
    assert disposition(ign, cgt, signal.SIGTSTP) == "default action"
    assert disposition(None, cgt, signal.SIGTERM) == "?"


def test_own_dispositions_are_read_from_proc() -> None:
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        ign, cgt = read_masks(os.getpid())
        assert disposition(ign, cgt, signal.SIGUSR1) == "ignored"
        signal.signal(signal.SIGUSR1, lambda *_: None)
        ign, cgt = read_masks(os.getpid())
        assert disposition(ign, cgt, signal.SIGUSR1) == "handled"
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        ign, cgt = read_masks(os.getpid())
        assert disposition(ign, cgt, signal.SIGUSR1) == "default action"
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_own_stat_is_read() -> None:
    st = read_stat(os.getpid())
    assert st is not None
    assert (st.ppid, st.pgid, st.sid) == (os.getppid(), os.getpgid(0), os.getsid(0))
    assert st.state in "RS"
    assert read_stat(2**22 + 12345) is None  # above pid_max: never a process


def _nlmsg(what: int, ts: int, payload: bytes) -> bytes:
    event = struct.pack("=IIQ", what, 0, ts) + payload
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0) + event
    msg = struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn
    return msg + b"\0" * (-len(msg) % 4)


def test_proc_connector_events_are_decoded() -> None:
    data = (_nlmsg(0x0, 9, struct.pack("=I", 1))  # the answer to LISTEN: EPERM
            + _nlmsg(0x1, 10, struct.pack("=IIII", 100, 100, 200, 200))
            + _nlmsg(0x2, 11, struct.pack("=II", 200, 200))
            + _nlmsg(0x4, 12, struct.pack("=IIII", 1, 1, 1, 1))  # UID change: skipped
            + _nlmsg(0x80000000, 13, struct.pack("=IIIIII", 200, 200, 7 << 8, 17, 100, 100)))
    assert parse_proc_events(data) == [
        (0x0, 9, (1,)),
        (0x1, 10, (100, 100, 200, 200)),
        (0x2, 11, (200, 200)),
        (0x80000000, 13, (200, 200, 7 << 8, 17)),
    ]


def test_truncated_proc_events_are_skipped() -> None:
    whole = _nlmsg(0x80000000, 13, struct.pack("=IIII", 200, 200, 9, 17))
    assert parse_proc_events(whole[:30]) == []
    assert parse_proc_events(b"") == []


# -- formatting -----------------------------------------------------------------


def test_signals_are_described_with_counts_and_dispositions() -> None:
    assert describe_signals([]) == "none directly"
    assert describe_signals([("SIGTERM", "handled")]) == "SIGTERM (handled)"
    assert describe_signals([("SIGTERM", "handled"), ("SIGTERM", "handled")]) == "SIGTERM x2 (handled)"
    assert (describe_signals([("SIGINT", "handled"), ("SIGTERM", "default action")])
            == "SIGINT (handled), SIGTERM (default action)")


@pytest.mark.parametrize("argv, expected", [
    (["/work/.venv/bin/python3", "/work/.venv/bin/celery", "--app", "tasks", "worker"],
     "celery --app tasks worker"),
    (["python", "polite.py"], "python polite.py"),
    (["/usr/bin/python3.11", "-m", "broker"], "python3.11 -m broker"),
    (["/opt/redis/redis-server unixsocket:/tmp/x/redis.sock"], "redis-server unixsocket:/tmp/x/redis.sock"),
    (["sh", "-c", "exec /usr/bin/sleep 100"], "sh -c exec /usr/bin/sleep 100"),
    ([], "?"),
])
def test_commands_are_shortened(argv: list[str], expected: str) -> None:
    assert short_command(argv, 200) == expected


def test_long_commands_are_cut_to_the_limit() -> None:
    text = short_command(["gunicorn", "--config", "gunicorn.conf.py", "app:create_app()", "--x"], 20)
    assert len(text) == 20 and text.endswith("...") and text.startswith("gunicorn --config")


def test_table_aligns_columns() -> None:
    table = format_table(["entry", "pid", "exit"], [["web", "12", "0"], ["worker", "12345", "SIGKILL"]],
                            right=[1])
    lines = table.splitlines()
    assert lines == [
        "entry     pid  exit",
        "------  -----  -------",
        "web        12  0",
        "worker  12345  SIGKILL",
    ]


def test_sigkilled_column() -> None:
    row = {"killed_by_report": False, "killed_by_honcho": False, "sigkilled": False}
    assert sigkilled_by(row) == "no"
    assert sigkilled_by({**row, "sigkilled": True}) == "yes"
    assert sigkilled_by({**row, "sigkilled": True, "killed_by_honcho": True}) == "by honcho"
    assert sigkilled_by({**row, "killed_by_report": True}) == "by report"


def test_arguments() -> None:
    args = parse_args(["some/dir", "--signal", "term", "--broadcast"])
    assert (args.dir, args.signal, args.broadcast, args.up, args.timeout, args.settle) == (
        "some/dir", "TERM", True, 3.0, 30, 2)
    assert parse_args(["d", "--url", "http://x/"]).up == 0.0  # a URL alone decides readiness
    assert parse_args(["d", "--url", "http://x/", "--up", "2"]).up == 2.0
    lines = parse_args(["d", "--ready-line", r"worker=ready\.$", "--ready-line", "beat=a=b"]).ready_lines
    assert [(entry, regex.pattern) for entry, regex in lines] == [("worker", r"ready\.$"), ("beat", "a=b")]
    for bad in (["d", "--signal", "KILL"], ["d", "--up", "-1"], [], ["d", "--ready-line", "worker"],
                ["d", "--ready-line", "worker=("], ["d", "--ready-line", "web=x", "--manager", "foreman"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2


@pytest.mark.parametrize("rc, expected", [
    (0, (0, None)), (130, (130, None)), (-9, (None, 9)), (-15, (None, 15)),
])
def test_popen_return_codes_become_wait_statuses(rc: int, expected: tuple[int | None, int | None]) -> None:
    assert decode_wait_status(rc_to_wait_status(rc)) == expected
