"""stopcheck's manager semantics, without processes: what each manager sends to whom and when."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tools.stopcheck.managers import Options, command_argv, expand_exec, parse_unit, plan, unit_environment
from tools.stopcheck.policy import (
    DONE,
    GROUP,
    KILL_REST,
    MAIN,
    REST,
    TERM_REST,
    TREE,
    WAIT,
    Policy,
    UnitState,
    step,
)

ENTRIES = [("web", "gunicorn --config gunicorn.conf.py"), ("broker", "python -m broker")]


def run(policy: Policy, timeline: list[tuple[float, bool, bool]],
        deps: bool = True) -> list[tuple[float, str, str]]:
    """Feed step() a timeline of (time, main alive, rest alive); what was sent when, to whom."""
    st = UnitState()
    out = []
    for now, main, rest in timeline:
        for s in step(policy, st, now, main_alive=main, rest_alive=rest, deps_done=deps):
            out.append((now, s.to, signal.Signals(s.signum).name))
    return out


def test_docker_sends_sigterm_to_pid1_then_sigkill_to_the_container_at_the_timeout() -> None:
    p = plan("docker", Path("/app"), ENTRIES, Options()).units[0].policy
    assert (p.signal_to, p.timeout, p.kill_to) == (MAIN, 10.0, TREE)
    sent = run(p, [(0, True, True), (5, True, True), (9.9, True, True), (10, True, True), (10.1, True, True)])
    assert sent == [(0, MAIN, "SIGTERM"), (10, TREE, "SIGKILL")]


def test_a_container_whose_pid1_exits_in_time_gets_no_sigkill() -> None:
    p = plan("docker", Path("/app"), ENTRIES, Options(timeout=3)).units[0].policy
    st = UnitState()
    step(p, st, 0, main_alive=True, rest_alive=True)
    assert step(p, st, 2, main_alive=False, rest_alive=True) == []  # the kernel kills the rest
    assert st.done == 2


def test_kubernetes_prestop_sleep_delays_sigterm_and_counts_in_the_grace_period() -> None:
    p = plan("kubernetes", Path("/app"), ENTRIES, Options(pre_stop=5)).units[0].policy
    timeline = [(0, True, False), (4.9, True, False), (5, True, False), (29, True, False), (30, True, False)]
    sent = run(p, timeline)
    assert sent == [(5, MAIN, "SIGTERM"), (30, TREE, "SIGKILL")]


def test_heroku_signals_every_process_of_the_dyno_and_waits_for_all_of_them() -> None:
    p = plan("heroku", Path("/app"), ENTRIES, Options()).units[0]
    assert p.argv[:2] == ("/bin/bash", "-c") and not p.pid1
    sent = run(p.policy, [(0, True, True), (1, False, True), (29, False, True), (30, False, True)])
    assert sent == [(0, TREE, "SIGTERM"), (30, REST, "SIGKILL")]
    assert p.policy.on_main_exit == WAIT


@pytest.mark.parametrize(("mode", "expected"), [
    ("control-group", [(0, TREE, "SIGTERM"), (2, REST, "SIGTERM"), (12, REST, "SIGKILL")]),
    ("mixed", [(0, MAIN, "SIGTERM"), (2, REST, "SIGKILL")]),
    ("process", [(0, MAIN, "SIGTERM")]),
])
def test_systemd_kill_modes_when_the_main_process_exits_first(mode: str, expected: list) -> None:
    p = plan("systemd", Path("/app"), ENTRIES, Options(kill_mode=mode, timeout=10)).units[0].policy
    sent = run(p, [(0, True, True), (2, False, True), (5, False, True), (12, False, True)])
    assert sent == expected


def test_systemd_timeout_kills_the_whole_unit_or_only_the_main_process() -> None:
    for mode, to in (("control-group", TREE), ("mixed", TREE), ("process", MAIN)):
        p = plan("systemd", Path("/app"), ENTRIES, Options(kill_mode=mode, timeout=10)).units[0].policy
        assert run(p, [(0, True, True), (10, True, True)])[-1] == (10, to, "SIGKILL"), mode


def test_systemd_stops_a_unit_only_after_the_units_ordered_after_it() -> None:
    p = Policy(after=("web",))
    st = UnitState()
    assert step(p, st, 0, main_alive=True, rest_alive=False, deps_done=False) == []
    assert [s.to for s in step(p, st, 3, main_alive=True, rest_alive=False, deps_done=True)] == [MAIN]
    assert st.begun == 3


def test_systemd_plan_from_unit_files(tmp_path: Path) -> None:
    (tmp_path / "app-broker-1.service").write_text(
        "[Unit]\nDescription=b\n[Service]\nEnvironment=\"HONCHO_PROCESS_NAME=broker.1\" \"A=1\"\n"
        "ExecStart=/venv/bin/python -m broker\nKillMode=mixed\nTimeoutStopSec=12\n")
    (tmp_path / "app-web-1.service").write_text(
        "[Unit]\nDescription=app web.1\nAfter=app-broker-1.service\n[Service]\nEnvironment=\"PORT=5000\"\n"
        "WorkingDirectory=/srv\nExecStart=/venv/bin/gunicorn --bind ${PORT} $OPTS\nKillSignal=SIGINT\n")
    units = {u.name: u for u in plan("systemd", Path("/app"), [], Options(units_dir=tmp_path)).units}
    broker, web = units["app-broker-1"], units["app-web-1"]
    assert web.entry == "web"  # from honcho export's Description
    assert broker.entry == "broker" and broker.policy.after == ("app-web-1",)  # stopped after web
    assert (broker.policy.on_main_exit, broker.policy.timeout) == (KILL_REST, 12.0)
    assert web.policy.on_main_exit == TERM_REST and web.policy.stop_signal == signal.SIGINT
    assert web.argv == ("/venv/bin/gunicorn", "--bind", "5000") and web.cwd == "/srv"
    assert web.clean_env and web.env["PATH"].startswith("/usr/local/sbin")


def test_unit_file_parsing() -> None:
    parsed = parse_unit("# c\n[Service]\nExecStart=/bin/a \\\n  --b\n"
                        "Environment=X=1\nEnvironment=\"Y=a b\"\n")
    assert parsed["Service.ExecStart"] == ["/bin/a  --b"]
    assert unit_environment(parsed["Service.Environment"]) == {"X": "1", "Y": "a b"}
    assert expand_exec("-/bin/x %%d ${A} $B", {"A": "1 2", "B": "3 4"}) == ("/bin/x", "%d", "1 2", "3", "4")


def test_docker_runs_a_command_that_needs_a_shell_as_sh_pid1() -> None:
    web = ("gunicorn", "--config", "gunicorn.conf.py")
    assert command_argv("gunicorn --config gunicorn.conf.py") == (web, False)
    assert command_argv("redis-server --port $REDIS_PORT") == (("/bin/sh", "-c",
                                                                "redis-server --port $REDIS_PORT"), True)
    p = plan("docker", Path("/app"), [("redis", "redis-server --port $REDIS_PORT")], Options())
    assert p.units[0].pid1 and p.notes and "shell form" in p.notes[0]


def test_docker_with_honcho_as_pid1_is_one_container() -> None:
    p = plan("docker", Path("/app"), ENTRIES, Options(pid1="honcho", timeout=30))
    (unit,) = p.units
    assert unit.pid1 and unit.argv[1:4] == ("-m", "honcho", "start") and unit.policy.timeout == 30


def test_foreman_ctrl_c_goes_to_its_group_and_sigterm_to_foreman() -> None:
    ctrl_c = plan("foreman", Path("/app"), ENTRIES, Options(signal="INT")).units[0]
    term = plan("foreman", Path("/app"), ENTRIES, Options(signal="TERM", timeout=7)).units[0]
    assert (ctrl_c.policy.signal_to, ctrl_c.policy.stop_signal) == (GROUP, signal.SIGINT)
    assert (term.policy.signal_to, term.policy.stop_signal) == (MAIN, signal.SIGTERM)
    assert term.argv[-2:] == ("-t", "7") and term.real_manager


def test_supervisord_simulated_stops_one_program_at_a_time() -> None:
    from tools.stopcheck.managers import supervisord_simulated

    units = supervisord_simulated(ENTRIES, Options()).units
    assert [u.policy.after for u in units] == [("broker",), ()]  # the last configured first
    assert all(u.policy.on_main_exit == DONE and u.policy.timeout == 10 for u in units)


def test_honcho_is_not_simulated() -> None:
    with pytest.raises(ValueError):
        plan("honcho", Path("/app"), ENTRIES, Options())


def test_supervisord_config_runs_each_entry_without_a_shell_and_sends_output_to_supervisord(
        tmp_path: Path) -> None:
    from tools.stopcheck.supervisord import config_text

    text = config_text(Path("/app"), ENTRIES, tmp_path, stopwaitsecs=7)
    assert "[program:web]\ncommand=gunicorn --config gunicorn.conf.py\n" in text
    assert text.count("stopwaitsecs=7") == 2 and "stopasgroup" not in text  # supervisord's defaults
    assert "nodaemon=true" in text and "stdout_logfile=/dev/fd/1" in text
    included = config_text(Path("/app"), ENTRIES, tmp_path, stopwaitsecs=7, include=tmp_path / "x.conf")
    assert f"files={tmp_path / 'x.conf'}" in included and "[program:" not in included
