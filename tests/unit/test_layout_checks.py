"""The layout checks of test_layout.py, each on a small tree that breaks (or keeps) its rule."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.unit.test_layout import (
    a_cycle,
    cycle_problems,
    import_graph,
    package_graph,
    parse,
    strongly_connected,
    sys_path_edits,
)


def test_a_src_layout_is_read_by_its_import_names_and_a_cycle_in_it_is_reported(tmp_path: Path) -> None:
    root = write(tmp_path, {
        "stopright/src/stopright/__init__.py": "",
        "stopright/src/stopright/a.py": "from stopright import b\n",
        "stopright/src/stopright/b.py": "import stopright.a\n",
    })
    problems, _ = cycle_problems(root)
    assert problems == ["module cycle: stopright.a -> stopright.b -> stopright.a"]


def test_each_tool_is_a_package_of_its_own(tmp_path: Path) -> None:
    root = write(tmp_path, {
        "tools/__init__.py": "",
        "tools/stopcheck/__init__.py": "",
        "tools/stopcheck/driver.py": "",
        "tools/bench/__init__.py": "",
        "tools/bench/run.py": "import tests.harness\n",
        "tests/harness.py": "from tools.stopcheck import driver\n",
    })
    graph = import_graph(parse(root))
    packages = package_graph(graph)
    assert packages == {"tools.bench": {"tests"}, "tests": {"tools", "tools.stopcheck"}}
    assert cycle_problems(root)[0] == []
    (root / "tools/stopcheck/driver.py").write_text("import tools.bench.run\n")  # the bench's harness
    assert cycle_problems(root)[0] == [
        "module cycle: tests.harness -> tools.stopcheck.driver -> tools.bench.run -> tests.harness",
        "package cycle: tests -> tools.stopcheck -> tools.bench -> tests"]


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_function_level_import_closes_a_cycle_and_it_is_reported(tmp_path: Path) -> None:
    root = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.c import g\n",
        "pkg/c.py": "from . import a\n",
        "pkg/d.py": "import pkg.a\n",  # imports into the cycle, not part of it
        ".venv/x.py": "import pkg.a\n",
    })
    graph = {k: set(v) for k, v in import_graph(parse(root)).items()}
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    (component,) = strongly_connected(graph)
    assert component == ["pkg.a", "pkg.b", "pkg.c"]
    assert a_cycle(graph, component) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_packages_that_import_each_other_are_a_cycle_but_test_modules_are_not(tmp_path: Path) -> None:
    root = write(tmp_path, {
        "one/__init__.py": "",
        "one/x.py": "import two.y\n",
        "two/__init__.py": "import one\n",  # importing two.y runs this first
        "two/y.py": "",
        "tests/unit/test_one.py": "import one.x\n",
        "tests/harness.py": "import two\n",
    })
    graph = import_graph(parse(root))
    assert set(graph["one.x"]) == {"two", "two.y"}
    packages = package_graph(graph)
    assert strongly_connected(packages) == [["one", "two"]]
    assert "tests.unit" not in packages and packages["tests"] == {"two"}


def test_sys_path_edits_are_found_and_reads_are_not() -> None:
    source = ("import sys\nsys.path.insert(0, 'x')\nsys.path[0:0] = ['y']\nsys.path += ['z']\n"
              "print(sys.path)\nfrom sys import path\nsys.path = []\n")
    assert sys_path_edits(ast.parse(source)) == [2, 3, 4, 6, 7]


def test_a_test_module_imported_by_code_is_reported_and_by_another_test_is_not(tmp_path: Path) -> None:
    root = write(tmp_path, {
        "tests/e2e/test_a.py": "def helper(): ...\n",
        "tests/e2e/test_b.py": "from tests.e2e.test_a import helper\n",
        "tools/__init__.py": "",
        "tools/x.py": "def f():\n    from tests.e2e.test_a import helper\n",
    })
    problems, _ = cycle_problems(root)
    assert problems == ["tools.x imports the test module tests.e2e.test_a (line 2)"]


def test_an_allowed_import_is_left_out_of_the_graph_until_it_is_gone(tmp_path: Path) -> None:
    root = write(tmp_path, {
        "web/__init__.py": "from web import views\n",
        "web/views.py": "import shared.db\n",
        "web/registry.py": "",
        "shared/__init__.py": "",
        "shared/db.py": "from web.registry import x\n",  # runs web/__init__: a cycle
    })
    problems, stale = cycle_problems(root)
    assert problems == ["module cycle: shared.db -> web -> web.views -> shared.db",
                        "package cycle: shared -> web -> shared"] and stale == []
    problems, stale = cycle_problems(root, {"web.registry", "web.gone"})
    assert problems == [] and stale == ["web.gone"]
