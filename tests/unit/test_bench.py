"""scripts/bench's own parts: the load client against a real HTTP server, the sets, the verdicts, the page."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.procset import free_port
from tools.bench.session import FOREIGN, PROJECT, REFERENCE, SETS, role_of, round_order
from tools.bench.summary import COLUMNS, cost_targets, markdown, summarize, targets

ROOT = Path(__file__).resolve().parents[2]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like gthread
    seen: list[str] = []
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        status = 503 if self.path == "/down" else 200
        self._reply(status, {"status": "ok"}, close=self.path == "/close")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            job_id = f"job-{len(self.seen)}"
            self.seen.append(body["task"])
        self._reply(202, {"id": job_id})

    def _reply(self, status: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:  # like gunicorn's sync worker: one request per connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    Handler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def load(port: int, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "tools.bench.load", "--port", str(port), *args], cwd=ROOT,
                         check=True, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def test_load_posts_exactly_the_count_and_returns_every_id(server: int) -> None:
    result = load(server, "--method", "POST", "--path", "/jobs", "--body", '{"task": "sleep"}',
                  "--count", "200", "--concurrency", "8", "--ids")
    assert result["ok"] == result["requests"] == 200
    assert sorted(result["ids"]) == sorted(f"job-{n}" for n in range(200))
    assert Handler.seen == ["sleep"] * 200
    assert result["rate"] > 0 and result["errors"] == {}


def test_load_reconnects_when_the_server_closes_each_connection(server: int) -> None:
    result = load(server, "--path", "/close", "--count", "50", "--concurrency", "4")
    assert result["ok"] == 50 and result["errors"] == {}


def test_load_counts_non_2xx_answers_as_errors(server: int) -> None:
    result = load(server, "--path", "/down", "--count", "20", "--concurrency", "2")
    assert result["ok"] == 0 and result["errors"] == {"status:503": 20}


def test_load_against_nothing_reports_connection_errors() -> None:
    port = free_port()
    result = load(port, "--seconds", "0.3", "--concurrency", "2")
    assert result["ok"] == 0
    assert any(k.startswith("error:") for k in result["errors"]), result


def figures(**overrides: float) -> dict:
    base = {"start_s": 1.0, "idle_stop_s": 0.5, "busy_short_stop_s": 1.0, "busy_short_remaining_s": 0.7,
            "busy_long_stop_s": 3.4, "busy_long_lost": 0, "busy_long_failed": 0, "e2e_rate": 500.0,
            "submit_rate": 800.0, "pss_mib": 250.0, "loaded_stop_s": 0.5, "loaded_dropped": 0,
            "loaded_5xx": 0, "loaded_lost": 0, "loaded_failed": 0, "loaded_accepted": 600,
            "loaded_sigkills": 0}
    return base | overrides


def verdicts(this: dict, ref: dict) -> list[bool]:
    return [t["met"] for t in targets(this, ref)]


def test_targets_met_when_every_figure_is_inside_its_bound() -> None:
    ref = figures(idle_stop_s=1.0, busy_long_lost=2, pss_mib=240.0, start_s=1.5, loaded_dropped=32)
    assert verdicts(figures(), ref) == [True] * 8


@pytest.mark.parametrize(("override", "index"), [
    ({"idle_stop_s": 1.01}, 0),                    # slower than the reference's 1.0 s
    ({"busy_short_stop_s": 1.21}, 1),              # 0.51 s after the work was done
    ({"busy_long_stop_s": 3.51}, 2),               # past grace 3 s + 0.5 s
    ({"busy_long_lost": 1}, 2),                    # fast but lost a job
    ({"loaded_dropped": 1}, 3),                    # one request reset under load
    ({"loaded_5xx": 1}, 3),
    ({"loaded_lost": 1}, 3),
    ({"loaded_failed": 1}, 3),
    ({"loaded_sigkills": 1}, 3),
    ({"start_s": 1.81}, 4),                        # > 1.2 x 1.5 s
    ({"e2e_rate": 499.0}, 5),
    ({"submit_rate": 799.0}, 6),
    ({"pss_mib": 264.1}, 7),                       # > 1.1 x 240 MiB
])
def test_each_target_is_missed_just_past_its_bound(override: dict, index: int) -> None:
    ref = figures(idle_stop_s=1.0, pss_mib=240.0, start_s=1.5)
    met = verdicts(figures(**override), ref)
    assert not met[index]
    assert all(m for i, m in enumerate(met) if i != index)


def test_summary_takes_medians_and_sums_job_counts() -> None:
    rounds = [{"idle_stop_s": v, "busy_long_lost": lost, "idle_stop_clean": clean}
              for v, lost, clean in ((0.3, 0, True), (0.9, 1, True), (0.5, 1, False))]
    summary = summarize(rounds)
    assert summary == {"idle_stop_s": 0.5, "busy_long_lost": 2, "idle_stop_clean": False}


@pytest.mark.parametrize(("cmdline", "role"), [
    (["/work/.venv/bin/python", "-m", "honcho", "start", "--no-colour"], "honcho"),
    (["/bin/sh", "-c", "gunicorn --bind 127.0.0.1:$PORT refapp:app"], "shell"),
    (["python3", "/v/bin/gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"], "web"),
    (["python3", "/v/bin/celery", "--app", "tasks.worker", "worker", "--loglevel", "INFO"], "worker"),
    (["python3", "/v/bin/celery", "--app", "reftasks", "beat", "--schedule", "/v/s"], "beat"),
    (["python", "-m", "broker", "--watch", "--server", "/v/redis-server"], "broker"),
    (["redis-server", "*:6390"], "broker"),
])
def test_each_process_is_counted_in_its_part_of_the_set(cmdline: list[str], role: str) -> None:
    assert role_of(cmdline) == role


# -- the stop-under-load client (tools/bench/load.py --flow jobs) ------------------------


def test_jobs_flow_posts_then_long_polls_each_job(server: int) -> None:
    result = load(server, "--flow", "jobs", "--count", "20", "--concurrency", "4", "--wait", "2")
    assert result["outcomes"] == {"POST": {"answered:202": 20}, "GET": {"answered:200": 20}}
    assert sorted(result["accepted"]) == sorted(f"job-{n}" for n in range(20))
    assert Handler.seen == ["echo"] * 20
    assert result["events"] == []


def test_jobs_flow_against_nothing_counts_refused_connections() -> None:
    result = load(free_port(), "--flow", "jobs", "--seconds", "0.3", "--concurrency", "2")
    assert set(result["outcomes"]["POST"]) == {"refused"}, result
    assert result["accepted"] == [] and all(e[2] == "refused" for e in result["events"])


@pytest.mark.parametrize(("how", "outcome"), [("close", "closed"), ("reset", "reset")])
def test_jobs_flow_tells_a_dropped_request_from_a_reset_one(how: str, outcome: str) -> None:
    """A server that reads the request, then closes (FIN) or aborts (RST) without answering."""
    import socket
    import struct

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            if how == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        result = load(listener.getsockname()[1], "--flow", "jobs", "--count", "5", "--concurrency", "1")
    finally:
        listener.close()
    assert result["outcomes"] == {"POST": {outcome: 5}}, result


# -- the three sets, stopright's cost, the page ---------------------------------------


def test_the_foreign_set_is_the_reference_plus_stopright_run_from_examples_foreign(tmp_path: Path) -> None:
    assert FOREIGN.cwd == ROOT / "examples" / "foreign"
    assert REFERENCE.cwd == ROOT / "tools" / "bench" / "reference"
    assert "stopright" in (FOREIGN.cwd / "Procfile").read_text()
    assert "stopright" not in (REFERENCE.cwd / "Procfile").read_text()
    ref, foreign = REFERENCE.extra_env(tmp_path / "r"), FOREIGN.extra_env(tmp_path / "f")
    # the same processes and PATH (a redis-server in the round's own bin/), stopright's settings on top
    assert {k: v.replace("/f/", "/r/") for k, v in foreign.items() if k in ref} == ref
    assert (tmp_path / "f" / "bin" / "redis-server").exists()
    assert foreign["SHUTDOWN_GRACE_SECONDS"] == "3.0"
    assert foreign["STOPRIGHT_SPOOL_DIR"] == str(tmp_path / "f" / "var")  # not the user's ~/.local/state


def test_rounds_alternate_so_every_set_runs_first_and_last() -> None:
    assert [s.key for s in SETS] == ["project", "foreign", "reference"]
    assert round_order(0) == (PROJECT, FOREIGN, REFERENCE)
    assert round_order(1) == (REFERENCE, FOREIGN, PROJECT)
    assert round_order(2) == round_order(0)


def cost_verdicts(foreign: dict, ref: dict) -> list[bool]:
    return [t["met"] for t in cost_targets(foreign, ref)]


def test_cost_targets_met_at_their_bounds() -> None:
    ref = figures(submit_rate=1000.0, e2e_rate=500.0, pss_mib=200.0)
    at_bounds = figures(submit_rate=980.0, e2e_rate=490.0, pss_mib=210.0)
    rows = cost_targets(at_bounds, ref)
    assert [t["met"] for t in rows] == [True, True, True]
    assert [round(t["ratio"], 3) for t in rows] == [0.98, 0.98, 1.05]
    assert rows[2]["figure"] == "210.0 MiB vs 200.0 MiB (1.050x)"


@pytest.mark.parametrize(("override", "index"), [
    ({"submit_rate": 979.0}, 0),   # < 0.98 x 1,000/s
    ({"e2e_rate": 489.0}, 1),      # < 0.98 x 500/s
    ({"pss_mib": 210.3}, 2),       # > 1.05 x 200 MiB
])
def test_each_cost_target_is_missed_just_past_its_bound(override: dict, index: int) -> None:
    ref = figures(submit_rate=1000.0, e2e_rate=500.0, pss_mib=200.0)
    met = cost_verdicts(figures(submit_rate=1000.0, e2e_rate=500.0, pss_mib=200.0) | override, ref)
    assert [i for i, m in enumerate(met) if not m] == [index]


def full_figures(**overrides: float) -> dict:
    """Every key a round's summary has (the page reads them all)."""
    from tools.bench.session import ROLES
    from tools.bench.summary import MEASURES

    base = {m.key: 1.0 for m in MEASURES} | {f"pss_{r}_mib": 1.0 for r in ROLES}
    base |= {f"{k}_sigkills": 0 for k in ("idle_stop", "busy_short", "busy_long", "loaded")}
    return figures() | base | {"busy_short_remaining_s": 0.7, "busy_long_remaining_s": 11.0} | overrides


def test_the_page_has_a_column_per_set_and_both_ratios_and_both_target_tables() -> None:
    medians = {"project": full_figures(submit_rate=900.0), "foreign": full_figures(submit_rate=950.0),
               "reference": full_figures(submit_rate=1000.0)}
    mach = {"cpu": "cpu", "cores": 2, "memory_gib": 4, "kernel": "k", "python": "3", "commit": "c"}
    report = {"finished": "now", "rounds": 3, "minutes": 10.0, "medians": medians, "machine": mach,
              "targets": targets(medians["project"], medians["reference"]),
              "cost_targets": cost_targets(medians["foreign"], medians["reference"])}
    page = markdown(report)
    header = next(line for line in page.splitlines() if line.startswith("| measure |"))
    assert [label for _, label in COLUMNS] == ["this set", "foreign app + stopright", "stock reference"]
    assert header.count("|") == 7 and all(label in header for _, label in COLUMNS)
    submit = next(line for line in page.splitlines() if line.startswith("| submit rate"))
    assert submit.split("|")[2:7] == [" 900/s ", " 950/s ", " 1,000/s ", " 0.90 ", " 0.95 "]
    assert "| submit rate at least 0.98x the reference's | 950/s vs 1,000/s (0.950x) | **no** |" in page
    assert "| end-to-end rate at least 0.98x the reference's | 1/s vs 1/s (1.000x) | yes |" in page
    for _, label in COLUMNS:  # the memory breakdown: a row per set
        assert any(line.startswith(f"| {label} | 1.0 |") for line in page.splitlines())
