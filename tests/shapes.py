"""Upgrade-shape checks: what stopright/upstream/ relies on in a library, checked against the installed one.

The checks themselves are stopright's (stopright/upstream/shapes.py: stopright runs the cheap
ones at start too); here, what the tests add: every reach has its check (:class:`Checks`).
Used by tests/unit/test_upstream_shapes*.py.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import stopright.upstream
from stopright.upstream.shapes import (  # noqa: F401  (the checks, for the tests)
    ShapeChanged,
    calls,
    check_attributes,
    check_calls,
    check_digest,
    check_no_call,
    check_override,
    check_self_attributes,
    check_signature,
    check_text,
    fail,
    function_tree,
    normalized,
    self_attributes,
    upstream_definition,
)

# -- every reach has its check --------------------------------------------------------------------


def upstream_modules() -> dict[str, Any]:
    """Every module of stopright/upstream/ that declares ``REACHES``."""
    out = {}
    for info in pkgutil.iter_modules(stopright.upstream.__path__):
        module = importlib.import_module(f"stopright.upstream.{info.name}")
        if hasattr(module, "REACHES"):
            out[module.__name__] = module
    return out


def unchecked_reaches(reaches: Mapping[str, str], checks: Mapping[str, Callable[[str], None]]) -> list[str]:
    """Keys of ``reaches`` that no check covers, and checks for keys that no longer exist (stale)."""
    return ([f"no shape check for the reach {key!r}" for key in reaches if key not in checks]
            + [f"a shape check for {key!r}, which is no reach (renamed?)" for key in checks
               if key not in reaches])


class Checks(dict[str, dict[str, Callable[[str], None]]]):
    """The shape checks of a test module: upstream module name -> {REACHES key: check}."""

    def __call__(self, module: Any, key: str) -> Callable[[Callable[[str], None]], Callable[[str], None]]:
        """Decorator: the function is the check of ``module.REACHES[key]``; it is called with ``key``."""
        def register(check: Callable[[str], None]) -> Callable[[str], None]:
            self.setdefault(module.__name__, {})[key] = check
            return check
        return register

    def cases(self) -> list[tuple[str, str]]:
        return [(module, key) for module, checks in self.items() for key in checks]

    def run(self, module: str, key: str) -> None:
        self[module][key](key)

    def problems(self, modules: Iterable[str]) -> list[str]:
        """What is wrong with the coverage of these upstream modules' reaches (empty: each has a check)."""
        found = upstream_modules()
        out = [f"{name}: no such module with REACHES in stopright/upstream/" for name in modules
               if name not in found]
        for name in modules:
            if name in found:
                out += [f"{name}: {p}" for p in unchecked_reaches(found[name].REACHES, self.get(name, {}))]
        return out + [f"{name}: checks for a module not covered here" for name in self if name not in modules]
