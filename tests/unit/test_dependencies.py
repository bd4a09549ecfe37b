"""Dependencies run one way (issue 9, point 3): each program depends on the shared layers, never on another.

    app/ (web)   tasks/ (worker, beat)   broker/ (embedded broker)   gunicorn.conf.py
          \\            |                    /
           jobs/ (the demo's job domain)  /
                 \\                       /
                  core/ (settings, logs, db, outages, broker probes, the Celery app)
                        \\
                         stopright/ (the reusable lifecycle: imports nothing above)

Read from the real import graph (tests/unit/test_layout.py: ``ast``, function-level imports too).
"""

from __future__ import annotations

from tests.unit.test_layout import ROOT, import_graph, is_test_module, parse

DEMO = {"app", "core", "jobs", "tasks", "broker", "gunicorn"}  # gunicorn: gunicorn.conf.py's module name
#: Each first-party package and what it may import (besides itself and third-party packages).
MAY_IMPORT = {
    "stopright": set(),
    "core": {"stopright"},
    "jobs": {"core", "stopright"},
    "app": {"core", "jobs", "stopright"},
    "tasks": {"core", "jobs", "stopright"},
    "broker": {"core", "stopright"},
    "gunicorn": {"app", "core", "stopright"},  # gunicorn.conf.py: names app:create_app, hooks
}


def imports_by_package() -> dict[str, dict[str, list[str]]]:
    """For each first-party package: the other first-party packages it imports, and from which module."""
    graph = import_graph(parse(ROOT))
    out: dict[str, dict[str, list[str]]] = {}
    for name, targets in graph.items():
        if is_test_module(name):
            continue
        top = "gunicorn" if name == "gunicorn.conf" else name.split(".")[0]
        for target in targets:
            other = "gunicorn" if target == "gunicorn.conf" else target.split(".")[0]
            if other != top:
                out.setdefault(top, {}).setdefault(other, []).append(f"{name} -> {target}")
    return out


def test_every_package_imports_only_the_layers_below_it() -> None:
    found = imports_by_package()
    wrong = [via for package, allowed in MAY_IMPORT.items()
             for other, vias in found.get(package, {}).items() if other in MAY_IMPORT and other not in allowed
             for via in vias]
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_lifecycle_package_imports_nothing_of_the_demo() -> None:
    found = imports_by_package().get("stopright", {})
    assert not set(found) & DEMO, found
