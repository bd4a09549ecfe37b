from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procset import ProcessSet

pytestmark = pytest.mark.e2e


@pytest.fixture
def procset(tmp_path: Path) -> Iterator[ProcessSet]:
    """A fresh process set (not started) whose processes are always killed at the end."""
    started: list[ProcessSet] = []

    def make(**env: str) -> ProcessSet:
        ps = ProcessSet(tmp_path, env=env)
        started.append(ps)
        return ps

    ps = make()
    ps.make = make  # type: ignore[attr-defined]  # another set on the same var/
    yield ps
    for each in started:
        each.cleanup()
