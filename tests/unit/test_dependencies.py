"""Dependencies run one way (issue 9, point 3): each program depends on the shared layers, never on another.

    app/ (web)   tasks/ (worker, beat)   broker/ (embedded broker)   gunicorn.conf.py
          \\            |                    /
           jobs/ (the demo's job domain)  /
                 \\                       /
                  core/ (settings, logs, db, outages, broker probes, the Celery app)
                        \\
                         stopright/src/stopright/ (the reusable lifecycle: imports nothing above)

    examples/ (a user's apps): stopright only
    tools/stopcheck/ (the report): nothing first-party
    tools/bench/ (the bench): the report's driver and the tests' harness (tests/procset.py ...)

Read from the real import graph (tests/unit/test_layout.py: ``ast``, function-level imports too;
each tool is a package of its own there).
"""

from __future__ import annotations

from tests.unit.test_layout import ROOT, import_graph, is_test_module, package_of, parse

DEMO = {"app", "core", "jobs", "tasks", "broker", "gunicorn"}  # gunicorn: gunicorn.conf.py's module name
#: Each first-party package and what it may import (besides itself and third-party packages).
MAY_IMPORT = {
    "stopright": set(),
    "examples": {"stopright"},
    "tools": set(),
    "tools.stopcheck": set(),
    "tools.bench": {"tools.stopcheck", "tests"},
    "core": {"stopright"},
    "jobs": {"core", "stopright"},
    "app": {"core", "jobs", "stopright"},
    "tasks": {"core", "jobs", "stopright"},
    "broker": {"core", "stopright"},
    "gunicorn": {"app", "core", "stopright"},  # gunicorn.conf.py: names app:create_app, hooks
}
#: Every first-party package: the ones above and the tests' harness, which none of them may import
#: unless it says so (the bench does).
FIRST_PARTY = {*MAY_IMPORT, "tests"}


def imports_by_package() -> dict[str, dict[str, list[str]]]:
    """For each first-party package: the other first-party packages it imports, and from which module."""
    graph = import_graph(parse(ROOT))
    out: dict[str, dict[str, list[str]]] = {}
    for name, targets in graph.items():
        if is_test_module(name):
            continue
        top = "gunicorn" if name == "gunicorn.conf" else package_of(name)
        for target in targets:
            other = "gunicorn" if target == "gunicorn.conf" else package_of(target)
            if other != top:
                out.setdefault(top, {}).setdefault(other, []).append(f"{name} -> {target}")
    return out


def test_every_package_imports_only_the_layers_below_it() -> None:
    found = imports_by_package()
    wrong = [via for package, allowed in MAY_IMPORT.items()
             for other, vias in found.get(package, {}).items()
             if other in FIRST_PARTY and other not in allowed
             for via in vias]
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_every_package_named_here_is_in_the_import_graph() -> None:
    packages = {package_of(name) for name in import_graph(parse(ROOT))} | {"gunicorn"}
    assert set(FIRST_PARTY) <= packages, set(FIRST_PARTY) - packages  # a moved package: a vacuous rule


def test_the_lifecycle_package_imports_nothing_of_the_demo() -> None:
    found = imports_by_package().get("stopright", {})
    assert not set(found) & DEMO, found
