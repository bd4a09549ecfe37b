"""The kinds of job the API accepts: their arguments and what they do.

Each kind is a pydantic model for ``args`` (the API validates with it before
anything is stored) and a function that runs the job in a pool child. Jobs
must be idempotent: a run handed back by a shutdown starts again from scratch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class SleepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=3600)


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
