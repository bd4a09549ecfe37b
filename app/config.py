"""Settings for every process of the set, read once from the environment.

One place decides paths, URLs and the shutdown budget, so the web, worker,
beat and broker processes can never disagree about them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

# honcho sends SIGKILL 5 s after the first process of the set exits
# (KILL_WAIT, hard-coded). An idle web process exits at once, so everything
# else must be gone within those 5 s: 3 s of grace for running work, then
# about a second for handing work back and closing connections, and the
# broker, which must outlive its clients, last.
DEFAULT_GRACE_SECONDS = 3.0


class Settings(BaseSettings):
    """Environment variables (upper-case names of these fields)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    var_dir: Path = Field(default=Path("var"), description="data of the embedded Redis, SQLite, beat")
    redis_url: str | None = Field(default=None, description="redis:// or unix:// URL; unset = embedded")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; unset = SQLite in var/")
    shutdown_grace_seconds: float = Field(default=DEFAULT_GRACE_SECONDS, gt=0, le=3600)
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
    log_level: str = "INFO"

    @property
    def data_dir(self) -> Path:
        return self.var_dir.resolve()

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def redis_socket(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def redis_client_url(self) -> str:
        """URL in redis-py's form (``redis://`` or ``unix://``)."""
        return self.redis_url or f"unix://{self.redis_socket}?db=0"

    @property
    def broker_url(self) -> str:
        """The same Redis in kombu's form (``unix://`` is ``redis+socket://``)."""
        url = self.redis_client_url
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"redis+socket://{parts.path}"
        return url

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'app.db'}"


@functools.cache
def get_settings() -> Settings:
    """The settings, or exit at start with one line per bad variable (no traceback)."""
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(f"{str(e['loc'][0]).upper()}={e.get('input')!r}: {e['msg']}"
                             for e in error.errors())
        raise SystemExit(f"invalid settings: {problems}") from None
