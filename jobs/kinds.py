"""The kinds of job the API accepts: their arguments and what they do.

Each kind is a pydantic model for ``args`` (the API validates with it before
anything is stored) and a function that runs the job in a pool child. Jobs
must be idempotent: a run handed back by a shutdown starts again from scratch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationInfo, field_validator


class SleepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=3600)

    @field_validator("seconds")
    @classmethod
    def _within_the_api_bound(cls, seconds: float, info: ValidationInfo) -> float:
        """The API passes its bound (``JOB_MAX_SECONDS``) as context; a worker running an
        accepted job does not, so a lowered bound never fails a job already accepted."""
        bound = (info.context or {}).get("job_max_seconds")
        if bound is not None and seconds > bound:
            raise ValueError(f"at most {bound:g} seconds here (JOB_MAX_SECONDS)")
        return seconds


class EchoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: JsonValue


def sleep(args: SleepArgs) -> Any:
    time.sleep(args.seconds)
    return {"slept": args.seconds}


def echo(args: EchoArgs) -> Any:
    return args.value


KINDS: dict[str, tuple[type[BaseModel], Callable[[Any], Any]]] = {
    "sleep": (SleepArgs, sleep),
    "echo": (EchoArgs, echo),
}
