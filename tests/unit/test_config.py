from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import logs
from core.config import get_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch):
    for name in ("BROKER_URL", "CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL"):
        monkeypatch.delenv(name, raising=False)  # the developer's own broker stays out
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(("name", "value"), [
    ("SHUTDOWN_GRACE_SECONDS", "abc"),
    ("SHUTDOWN_GRACE_SECONDS", "0"),
    ("PORT", "70000"),
    ("WEB_WORKER_CLASS", "eventlet"),
    ("LOG_LEVEL", "loud"),
])
def test_a_bad_setting_stops_with_a_message_naming_it(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        get_settings()
    assert name in str(stopped.value) and repr(value) in str(stopped.value)


def test_defaults_point_at_the_embedded_broker_and_sqlite(monkeypatch, tmp_path):
    for name in ("REDIS_URL", "DATABASE_URL", "SHUTDOWN_GRACE_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VAR_DIR", str(tmp_path))
    settings = get_settings()
    assert settings.embedded_redis
    assert settings.broker_url == f"redis+socket://{tmp_path}/redis.sock"
    assert settings.redis_client_url == f"unix://{tmp_path}/redis.sock?db=0"
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path}/app.db"
    assert settings.shutdown_grace_seconds == 3.0


def test_a_redis_url_is_used_for_both_clients(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/2")
    settings = get_settings()
    assert not settings.embedded_redis
    assert settings.broker_url == settings.redis_client_url == "redis://127.0.0.1:6390/2"


@pytest.fixture
def no_broker_env(monkeypatch, tmp_path):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("VAR_DIR", str(tmp_path))


@pytest.mark.parametrize("name", ["BROKER_URL", "CELERY_BROKER_URL"])
def test_an_amqp_broker_url_replaces_redis_everywhere(monkeypatch, no_broker_env, name):
    monkeypatch.setenv(name, "amqp://guest:guest@127.0.0.1:5672/jobs")
    settings = get_settings()
    assert settings.broker_url == "amqp://guest:guest@127.0.0.1:5672/jobs"
    assert settings.broker_is_amqp
    assert not settings.embedded_redis  # the broker entry idles
    assert settings.redis_client_url is None


def test_a_redis_broker_url_wins_over_redis_url(monkeypatch, no_broker_env):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/2")
    monkeypatch.setenv("BROKER_URL", "redis+socket:///tmp/other.sock")
    settings = get_settings()
    assert not settings.broker_is_amqp
    assert settings.broker_url == "redis+socket:///tmp/other.sock"
    assert settings.redis_client_url == "unix:///tmp/other.sock"  # readiness pings the same Redis


def test_the_same_url_in_both_variables_is_fine(monkeypatch, no_broker_env):
    monkeypatch.setenv("BROKER_URL", "amqp://127.0.0.1/a")
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://127.0.0.1/a")
    assert get_settings().broker_url == "amqp://127.0.0.1/a"


@pytest.mark.parametrize(("env", "says"), [
    ({"BROKER_URL": "amqp://u:secret@h/a", "CELERY_BROKER_URL": "amqp://u:secret@h/b"},
     "BROKER_URL and CELERY_BROKER_URL differ"),
    ({"CELERY_BROKER_READ_URL": "amqp://h/r"}, "CELERY_BROKER_READ_URL not supported"),
    ({"BROKER_URL": "sqs://u:secret@h"}, "unsupported broker"),
])
def test_a_broker_celery_would_not_share_stops_the_start(monkeypatch, no_broker_env, env, says):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        get_settings()
    message = str(stopped.value)
    assert says in message and "BROKER_URL" in message
    assert "secret" not in message  # a URL's password is never printed


def test_log_level_is_the_validated_setting_in_any_case(monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "warning")

    assert get_settings().log_level == "WARNING"
    assert logs.logging_config()["root"]["level"] == "WARNING"
    assert logs.LOGGING["root"]["level"] == "INFO"  # the template is left alone


def test_a_bad_log_level_stops_a_process_at_start_naming_it(tmp_path):
    """The broker launcher, started for real: its first step reads the settings and configures logs."""
    env = {**os.environ, "LOG_LEVEL": "loud", "VAR_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "broker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 1
    assert done.stderr.strip().startswith("invalid settings: LOG_LEVEL='loud': "), done.stderr
    assert "Traceback" not in done.stderr
