"""Settings for every process of the set, read once from the environment.

One place decides paths, URLs and the shutdown budget, so the web, worker,
beat and broker processes can never disagree about them.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

# honcho sends SIGKILL 5 s after the first process of the set exits
# (KILL_WAIT, hard-coded). An idle web process exits at once, so everything
# else must be gone within those 5 s: 3 s of grace for running work, then
# about a second for handing work back and closing connections, and the
# broker, which must outlive its clients, last.
DEFAULT_GRACE_SECONDS = 3.0

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
# Celery reads these from the environment itself and lets them win over its
# configuration: one broker for Celery, another for readiness and the waits.
_CELERY_SPLIT_BROKER = ("CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")


#: Settings whose value never appears in a message.
_SECRETS = ("API_TOKEN",)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    """Environment variables (upper-case names of these fields)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    var_dir: Path = Field(default=Path("var"), description="data of the embedded Redis, SQLite, beat")
    redis_url: str | None = Field(default=None, description="redis:// or unix:// URL; unset = embedded")
    # The Celery broker: Redis or RabbitMQ. Unset: the Redis above (REDIS_URL
    # or the embedded one). Celery reads CELERY_BROKER_URL on its own and lets
    # it override its configuration, so it is accepted as the same setting:
    # every process, and /readyz, then use the broker Celery uses.
    explicit_broker_url: str | None = Field(
        default=None, validation_alias=AliasChoices("BROKER_URL", "CELERY_BROKER_URL"),
        validate_default=True, description="redis://, unix:// or amqp:// URL; unset = the Redis above")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; unset = SQLite in var/")
    # How long one wait on PostgreSQL may take (a connection attempt, one statement's answer)
    # before it fails as an outage (503): a frozen server answers nothing, ever (core/db.py).
    database_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    shutdown_grace_seconds: float = Field(default=DEFAULT_GRACE_SECONDS, gt=0, le=3600)
    # After a stop signal, how long web serves on (/readyz 503) before it stops
    # accepting: a load balancer's time to stop routing here (stopright/budget.py).
    shutdown_drain_seconds: float = Field(default=0.0, ge=0, le=3600)
    port: int = Field(default=5000, ge=1, le=65535)
    bind_host: str = "127.0.0.1"  # 0.0.0.0 where a platform routes traffic to you
    web_workers: int = Field(default=2, ge=1, le=64)
    web_threads: int = Field(default=8, ge=1, le=256)
    web_worker_class: Literal["gthread", "sync"] = "gthread"
    worker_concurrency: int = Field(default=2, ge=1, le=256)
    # A running job whose heartbeat stopped this long ago (its worker died) is requeued.
    job_lease_seconds: float = Field(default=30.0, ge=1)
    # A queued job not started this long after it was queued (message lost) is republished.
    job_queued_lease_seconds: float = Field(default=60.0, ge=1)
    # Runs that ended without finishing (crashes; shutdowns do not count) before "failed".
    job_max_attempts: int = Field(default=5, ge=1)
    sweep_interval_seconds: float = Field(default=15.0, gt=0)
    # Beat's leader lease (core/leader.py): with beat on several hosts, one schedules; another
    # takes over about this long after the leader dies, about a second after it stops.
    beat_lease_seconds: float = Field(default=10.0, ge=1, le=3600)
    log_level: str = "INFO"  # core/logs.py: one of LOG_LEVELS, any case
    # What one client may ask of the set: without bounds anyone who reaches the API
    # can pin every pool child with long jobs, or every web thread with long polls.
    job_max_seconds: float = Field(default=300.0, gt=0, le=3600, description="the longest sleep job")
    api_max_wait_seconds: float = Field(default=30.0, ge=0, le=300, description="the longest long poll")
    # Set: every route but /healthz and /readyz needs ``Authorization: Bearer <token>``.
    api_token: SecretStr | None = Field(default=None, min_length=16)

    @field_validator("log_level")
    @classmethod
    def _level_name(cls, level: str) -> str:
        if level.strip().upper() not in LOG_LEVELS:
            raise ValueError(f"not a log level: one of {', '.join(LOG_LEVELS)}")
        return level.strip().upper()  # "debug" is DEBUG

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, token: object) -> object:
        return None if isinstance(token, str) and not token.strip() else token

    @field_validator("explicit_broker_url")
    @classmethod
    def _one_broker(cls, url: str | None) -> str | None:
        """One broker for every process: the one Celery will really use."""
        split = [name for name in _CELERY_SPLIT_BROKER if os.environ.get(name)]
        if split:
            raise ValueError(f"{' and '.join(split)} not supported here (readiness would check "
                             "another broker than Celery uses); set BROKER_URL")
        ours, celerys = os.environ.get("BROKER_URL"), os.environ.get("CELERY_BROKER_URL")
        if ours and celerys and ours != celerys:
            raise ValueError("BROKER_URL and CELERY_BROKER_URL differ (Celery would use "
                             "CELERY_BROKER_URL); set one of them")
        if url is not None and urlsplit(url).scheme not in REDIS_SCHEMES + AMQP_SCHEMES:
            raise ValueError("unsupported broker; use redis://, rediss://, unix:// (Redis) "
                             "or amqp://, amqps:// (RabbitMQ)")
        return url or None

    @property
    def data_dir(self) -> Path:
        return self.var_dir.resolve()

    @property
    def embedded_redis(self) -> bool:
        """No broker given at all: the Procfile's ``broker`` entry runs Redis."""
        return not self.redis_url and not self.explicit_broker_url

    @property
    def redis_socket(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def _broker(self) -> str:
        return self.explicit_broker_url or self.redis_url or f"unix://{self.redis_socket}?db=0"

    @property
    def broker_is_amqp(self) -> bool:
        return urlsplit(self._broker).scheme in AMQP_SCHEMES

    @property
    def redis_client_url(self) -> str | None:
        """The Redis broker in redis-py's form (``redis://`` or ``unix://``); None for RabbitMQ."""
        parts = urlsplit(self._broker)
        if parts.scheme in AMQP_SCHEMES:
            return None
        if parts.scheme == "redis+socket":
            return f"unix://{parts.path}" + (f"?{parts.query}" if parts.query else "")
        return self._broker

    @property
    def broker_url(self) -> str:
        """The broker in kombu's form, as Celery uses it (``unix://`` is ``redis+socket://``)."""
        parts = urlsplit(self._broker)
        if parts.scheme == "unix":
            return f"redis+socket://{parts.path}"
        return self._broker

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'app.db'}"


@functools.cache
def get_settings() -> Settings:
    """The settings, or exit at start with one line per bad variable (no traceback)."""
    try:
        return Settings()
    except ValidationError as error:
        raise SystemExit(f"invalid settings: {'; '.join(map(_problem, error.errors()))}") from None


def _problem(error: ErrorDetails) -> str:
    """``NAME='value': message``, the variable's own name, a URL's password hidden."""
    name = str(error["loc"][0])
    name = "BROKER_URL" if name == "explicit_broker_url" else name.upper()
    value = error.get("input")
    if name in _SECRETS and value is not None:
        value = "***"
    elif isinstance(value, str):  # amqp://user:secret@host -> amqp://user:***@host
        value = re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", value)
    return f"{name}: {error['msg']}" if value is None else f"{name}={value!r}: {error['msg']}"
