"""deploy/: the Dockerfile and Kubernetes manifest run the Procfile's commands within their budget,
and the load balancers' files (haproxy.cfg, nginx-upstream.conf) take a host out within its drain.

There is no Docker engine or cluster here; the stop itself is tested by
tests/e2e/test_containers_stop.py, which runs the same commands as PID 1 of a
PID namespace. ``haproxy -c`` checks haproxy.cfg where haproxy is installed
(CI installs it); nginx is not installed, so nginx-upstream.conf is only read.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from core.config import Settings
from stopright.budget import HONCHO_KILL_WAIT, WEB_AFTER_DRAIN
from tests.procset import ROOT
from tests.servers import missing
from tools.stopcheck.text import parse_procfile

PROCFILE = dict(parse_procfile((ROOT / "Procfile").read_text()))
HAND_BACK_SECONDS = 2  # the worker's hand-back and closes after the grace (stopright/worker_stop.py)


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile line, continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def manifest() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()) if d]


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifest() if d["kind"] == "Deployment"}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's settings: the ConfigMaps it loads, then its own env (which wins)."""
    maps = {d["metadata"]["name"]: d["data"] for d in manifest() if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_dockerfile_runs_the_web_entry_as_pid1_in_exec_form() -> None:
    lines = dockerfile()
    cmd = [args for ins, args in lines if ins == "CMD"]
    assert len(cmd) == 1 and cmd[0].startswith("[")  # exec form: no /bin/sh -c as PID 1
    assert json.loads(cmd[0]) == shlex.split(PROCFILE["web"])
    assert ("STOPSIGNAL", "SIGTERM") in lines
    assert not [args for ins, args in lines if ins == "ENTRYPOINT"]  # nothing wraps the program
    assert "honcho" not in cmd[0]
    env = " ".join(args for ins, args in lines if ins == "ENV")
    assert "BIND_HOST=0.0.0.0" in env  # reachable from outside the container


def test_dockerfile_names_every_other_entry_and_says_the_broker_is_not_for_containers() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for name in ("worker", "beat"):
        assert PROCFILE[name] in text, name
    assert "broker" in text and "NOT for containers" in text and "REDIS_URL" in text


def test_manifest_has_one_deployment_per_entry_but_the_broker_with_the_procfile_commands() -> None:
    deps = deployments()
    assert set(deps) == set(PROCFILE) - {"broker"}
    for name, d in deps.items():
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert container["command"] == shlex.split(PROCFILE[name]), name  # PID 1, no shell
        assert "args" not in container
        assert container["image"] == deps["web"]["spec"]["template"]["spec"]["containers"][0]["image"]
    # One beat, the old one gone before the new one starts; the leader lease (core/leader.py) is the
    # second guard, for two beats at once all the same.
    assert deps["beat"]["spec"]["replicas"] == 1
    assert deps["beat"]["spec"]["strategy"] == {"type": "Recreate"}


def test_broker_and_database_are_external_and_said_so() -> None:
    text = (ROOT / "deploy" / "kubernetes.yaml").read_text()
    assert "NOT for Kubernetes" in text and "REDIS_URL" in text and "DATABASE_URL" in text
    for d in deployments().values():
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "app-env"}} in container["envFrom"]
        assert "REDIS_URL" not in env_of(container) and "BROKER_URL" not in env_of(container)


def test_termination_grace_period_covers_drain_grace_hand_back_and_a_margin() -> None:
    for name, d in deployments().items():
        spec = d["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = env_of(container)
        need = (float(env.get("SHUTDOWN_DRAIN_SECONDS", 0)) + float(env["SHUTDOWN_GRACE_SECONDS"])
                + HAND_BACK_SECONDS)
        period = spec["terminationGracePeriodSeconds"]
        assert need + 1 <= period <= need + 10, (name, need, period)  # a margin, not a guess


def test_web_drains_behind_a_readiness_probe_on_readyz() -> None:
    (web,) = deployments()["web"]["spec"]["template"]["spec"]["containers"]
    assert float(env_of(web)["SHUTDOWN_DRAIN_SECONDS"]) >= 3  # the Service's propagation delay
    probe = web["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    assert probe["port"] in ("http", int(env_of(web)["PORT"]))
    assert web["readinessProbe"]["periodSeconds"] < float(env_of(web)["SHUTDOWN_DRAIN_SECONDS"])
    assert env_of(web)["BIND_HOST"] == "0.0.0.0"
    service = next(d for d in manifest() if d["kind"] == "Service")
    assert service["spec"]["selector"] == deployments()["web"]["spec"]["selector"]["matchLabels"]
    for d in deployments().values():  # the worker and beat have no drain: the grace is theirs
        (c,) = d["spec"]["template"]["spec"]["containers"]
        if d["metadata"]["name"] != "web":
            assert "SHUTDOWN_DRAIN_SECONDS" not in env_of(c)


def test_the_image_build_context_holds_no_secrets_nor_history(tmp_path) -> None:
    """``COPY . .`` copies the build context: .dockerignore keeps .env files and .git out of the image.

    docker-py's ``exclude_paths`` applies .dockerignore with Docker's own rules (no engine here).
    """
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for name in (".env", ".env.production", ".git/config", ".git/objects/ab/cdef", "var/app.db",
                 ".venv/bin/python", "app/api.py", "Procfile", "deploy/Dockerfile"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")

    context = exclude_paths(str(tmp_path), patterns, dockerfile="deploy/Dockerfile")

    assert sorted(context) == ["Procfile", "app", "app/api.py", "deploy", "deploy/Dockerfile"]
    assert not [p for p in exclude_paths(str(ROOT), patterns) if p.split("/")[0] in (".git", ".env")]


def test_dockerfile_copies_every_local_requirement_before_installing_the_requirements() -> None:
    lines = dockerfile()
    install = lines.index(("RUN", "pip install -r requirements.txt"))
    copied = {args.split()[0] for ins, args in lines[:install] if ins == "COPY"}
    local = {re.sub(r"\[.*\]$", "", line.removeprefix("-e").strip()).removeprefix("./")
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.removeprefix("-e").strip().startswith(("./", "../"))}
    assert local == {"stopright"}  # the only path requirement, as a user's app would name it
    assert {"requirements.txt", *local} <= copied, lines[:install]


# -- load balancers -----------------------------------------------------------------------------

HAPROXY = ROOT / "deploy" / "haproxy.cfg"
NGINX = ROOT / "deploy" / "nginx-upstream.conf"
#: The longest long poll by default (API_MAX_WAIT_SECONDS), and the most it may be set to.
LONG_POLL = Settings.model_fields["api_max_wait_seconds"].default
#: A drain of more than this is cut under honcho (stopright/budget.py).
HONCHO_MAX_DRAIN = HONCHO_KILL_WAIT - WEB_AFTER_DRAIN
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def seconds(value: str, default_unit: str = "ms") -> float:
    """An HAProxy or nginx time (``500ms``, ``40s``, ``1m``; a bare number in ``default_unit``)."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", value).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit or default_unit]


def haproxy_sections(text: str | None = None) -> dict[str, list[list[str]]]:
    """``{"defaults": [[keyword, arg, ...], ...], "backend web": ...}``, comments dropped."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in (HAPROXY.read_text() if text is None else text).splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            current.append(words)
    return sections


def haproxy_drain() -> float:
    """The SHUTDOWN_DRAIN_SECONDS the file is written for (its header says it)."""
    (drain,) = re.findall(r"SHUTDOWN_DRAIN_SECONDS=(\d+(?:\.\d+)?)", HAPROXY.read_text())
    return float(drain)


def setting(lines: list[list[str]], *keyword: str) -> list[str]:
    """The arguments of the last line starting with ``keyword`` (HAProxy: the last one wins)."""
    found = [words[len(keyword):] for words in lines if tuple(words[:len(keyword)]) == keyword]
    assert found, keyword
    return found[-1]


def test_haproxy_takes_a_draining_host_out_of_rotation_before_its_drain_ends() -> None:
    """inter x fall + check time (min(timeout connect, inter) + timeout check) + a margin <= the drain."""
    sections = haproxy_sections()
    defaults, backend = sections["defaults"], sections["backend web"]
    check = dict(zip(setting(backend, "default-server")[::2], setting(backend, "default-server")[1::2],
                     strict=True))
    inter, fall = seconds(check["inter"]), int(check["fall"])
    assert int(check["rise"]) >= 2  # one good answer is not enough to come back
    check_time = min(seconds(setting(defaults, "timeout", "connect")[0]), inter) + seconds(
        setting(defaults, "timeout", "check")[0])
    drain = haproxy_drain()
    assert inter * fall + check_time + 0.5 <= drain, (inter, fall, check_time, drain)
    assert drain <= HONCHO_MAX_DRAIN  # the same drain works with honcho on each host
    assert setting(backend, "option", "httpchk") == ["GET", "/readyz"]
    assert setting(backend, "http-check", "expect") == ["status", "200"]
    servers = [words for words in backend if words[0] == "server"]
    assert len(servers) >= 2 and all(words[-1] == "check" for words in servers), servers
    assert f"SHUTDOWN_DRAIN_SECONDS={drain:g}" in (ROOT / "docs" / "several-hosts.md").read_text()


def test_haproxy_outlasts_the_longest_long_poll_and_retries_nothing_by_default() -> None:
    defaults = haproxy_sections()["defaults"]
    for side in ("server", "client"):
        assert seconds(setting(defaults, "timeout", side)[0]) > LONG_POLL, side
    assert setting(defaults, "retries") == ["0"]  # HAProxy's default is 3: off, the drain alone must do
    optional = HAPROXY.read_text()
    for line in ("# retry-on conn-failure empty-response", "# option redispatch",
                 "# http-request disable-l7-retry if METH_POST"):
        assert line in optional, line  # offered, commented out
    assert "# stats socket" in optional


def installed(server: str) -> str:
    """The path of Debian's ``server`` binary (in /usr/sbin: not on a user's PATH), or a skip."""
    path = shutil.which(server) or f"/usr/sbin/{server}"
    if not os.access(path, os.X_OK):
        missing(f"{server} is not installed (Debian package {server})", f"REQUIRE_{server.upper()}")
    return path


def test_haproxy_accepts_the_file() -> None:
    haproxy = installed("haproxy")
    done = subprocess.run([haproxy, "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("retries", [False, True])
def test_haproxy_accepts_the_file_as_the_several_host_bed_turns_it(tmp_path, retries: bool) -> None:
    """tests/hosts.py points the file at its hosts; the bench also uncomments its retry lines."""
    from tests import balancers

    haproxy = installed("haproxy")
    config = tmp_path / "haproxy.cfg"
    config.write_text(balancers.haproxy_config(tmp_path / "admin.sock", retries=retries))
    done = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    sections = haproxy_sections(config.read_text())
    retry_lines = [words for section in sections.values() for words in section
                   if words[0] in ("retries", "retry-on") or words[:2] == ["option", "redispatch"]]
    turned_on = [["retries", "2"], ["option", "redispatch", "1"],
                 ["retry-on", "conn-failure", "empty-response"]]
    assert retry_lines == (turned_on if retries else [["retries", "0"]])


def test_nginx_accepts_the_upstream_file_as_the_several_host_bed_wraps_it(tmp_path) -> None:
    """tests/balancers.py puts deploy/nginx-upstream.conf in an http block, pointed at its hosts."""
    from tests import balancers

    nginx = installed("nginx")
    config = tmp_path / "nginx.conf"
    config.write_text(balancers.nginx_config(tmp_path))
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "log")],
                          capture_output=True, text=True, timeout=30)
    # Its bind address exists only in the bed's namespace: the syntax check is what counts here.
    assert "syntax is ok" in done.stderr, done.stderr
    servers = [w for w in nginx_directives(config.read_text()) if w[0] == "server" and len(w) > 1]
    assert [words[1] for words in servers] == ["10.231.1.11:8000", "10.231.1.12:8000"], servers
    assert all("max_fails=1" in words for words in servers), servers  # the file's own parameters kept


def nginx_directives(text: str) -> list[list[str]]:
    """Every directive of an nginx file as its words (quotes kept), comments dropped."""
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return [statement.split() for statement in re.split(r"[;{}]", body) if statement.strip()]


def test_nginx_upstream_has_every_host_passive_checks_and_outlasts_the_longest_long_poll() -> None:
    directives = nginx_directives(NGINX.read_text())
    named = {words[0]: words[1:] for words in directives}
    servers = [words for words in directives if words[0] == "server" and len(words) > 1]
    assert len(servers) >= 2, servers
    for words in servers:
        assert {w.partition("=")[0] for w in words} >= {"max_fails", "fail_timeout"}, words
    assert "keepalive" in named and named["proxy_http_version"] == ["1.1"]
    assert seconds(named["keepalive_timeout"][0], "s") < 2  # gunicorn.conf.py: keepalive = 2
    assert seconds(named["proxy_read_timeout"][0], "s") > LONG_POLL
    retry_on = set(named["proxy_next_upstream"])
    assert {"error", "timeout"} <= retry_on
    assert not retry_on & {"non_idempotent", "http_502", "http_503", "http_504"}, retry_on
