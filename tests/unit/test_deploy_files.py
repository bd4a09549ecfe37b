"""deploy/Dockerfile and deploy/kubernetes.yaml, read: the commands are the Procfile's, the budget fits.

There is no Docker engine or cluster here; the stop itself is tested by
tests/e2e/test_containers_stop.py, which runs the same commands as PID 1 of a
PID namespace.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import yaml

from tests.procset import ROOT
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
