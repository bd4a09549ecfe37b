"""Markers by place: every test under tests/e2e/ is ``e2e``, so ``-m "not e2e"`` is the unit lane.

A ``pytestmark`` in a conftest.py marks nothing (pytest reads it from test
modules only), hence this hook. ``scripts/test -m "not e2e"``: the unit tests
alone, in seconds; ``scripts/test -m e2e``: the end-to-end tests alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

E2E_DIR = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)
