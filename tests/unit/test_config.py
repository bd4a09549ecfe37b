from __future__ import annotations

import pytest

from app.config import get_settings


@pytest.fixture(autouse=True)
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(("name", "value"), [
    ("SHUTDOWN_GRACE_SECONDS", "abc"),
    ("SHUTDOWN_GRACE_SECONDS", "0"),
    ("PORT", "70000"),
    ("WEB_WORKER_CLASS", "eventlet"),
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
