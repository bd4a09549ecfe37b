"""The layout's rules (issue 9): no Python file over 400 lines, no ``sys.path`` edits, no import cycles.

The import graph is read with ``ast`` from every Python file of the repository
(not .venv, var, __pycache__ or hidden directories); module-level and
function-level imports both count, ``if TYPE_CHECKING:`` ones too (a
dependency for the reader even when not for the interpreter). Importing
``a.b.c`` also runs ``a`` and ``a.b`` (their ``__init__``), unless the
importer is inside them already.

Test modules (``test_*.py``, ``conftest.py``) are entry points: pytest imports
them by basename (tests/unit and tests/e2e have no ``__init__.py``). They
belong to no package, so a unit test of ``tools.bench`` importing it while
``tools.bench`` uses the harness in ``tests/`` is no cycle; importing a test module
from anything but another test module is refused instead.

stopright's modules are read from its distribution's ``src`` folder (they are
imported as ``stopright.*``, not ``stopright.src.stopright.*``); each program in
``tools/`` (``tools.stopcheck``, ``tools.bench``) counts as a package of its own.

The ALLOWED_* lists below name what still fails outside the tools' area, on
main, while it is reorganised (issue 9, points 1-3). An entry that no longer
fails is reported too, so the lists only shrink.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 400
SKIP_DIRS = {".venv", "var", "__pycache__", "node_modules"}
#: Folders whose files are imported by their path below them: the distribution's src layout.
SOURCE_ROOTS = (Path("stopright") / "src",)
#: Top-level folders that group programs: each of their subpackages is a package of its own.
GROUPS = {"tools"}

# Files over MAX_LINES, outside the tools' area: none (issue 9 point 1; the last three, test_api.py,
# test_ledger.py and test_shutdown_registry.py, were split by subject). Kept so the rule has one place
# to name an exception, and empty: an entry that no longer fails is reported.
ALLOWED_LONG: set[str] = set()
# Modules whose imports from other packages may close cycles, left out of the graph: none.
ALLOWED_IMPORTS_OF: set[str] = set()


# -- reading the repository ---------------------------------------------------------------------


def python_files(root: Path) -> list[Path]:
    out = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        out += [Path(directory) / f for f in sorted(files) if f.endswith(".py")]
    return out


def module_name(path: Path, root: Path) -> str:
    """The dotted name the file is imported as (from the root, or from its source root under
    SOURCE_ROOTS); a file like gunicorn.conf.py: its path."""
    relative = path.relative_to(root)
    source = next((s for s in SOURCE_ROOTS if relative.is_relative_to(s)), None)
    parts = list((relative.relative_to(source) if source else relative).with_suffix("").parts)
    if any("." in p for p in parts):
        return str(relative)  # not importable by a dotted name
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(name: str) -> str:
    """The package a module counts in: its top-level one, or its program's in a group (tools.bench)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in GROUPS and len(parts) > 1 else parts[0]


def is_test_module(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("test_") or leaf == "conftest"


def parse(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    modules = {}
    for path in python_files(root):
        modules[module_name(path, root)] = (path, ast.parse(path.read_text(), str(path)))
    return modules


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The longest prefix of ``name`` that is a module of the repository."""
    known = set(known)
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def imports_of(name: str, path: Path, tree: ast.Module, known: set[str]) -> dict[str, int]:
    """Repository modules imported by one module, anywhere in it: {module: line of the first import}."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target is None or target == name:
            return
        parts = target.split(".")
        for n in range(1, len(parts) + 1):  # a.b.c runs a and a.b first, unless name is inside them
            ancestor = ".".join(parts[:n])
            inside = name == ancestor or name.startswith(ancestor + ".")
            if ancestor in known and not inside and ancestor != name:
                targets.setdefault(ancestor, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_resolve(alias.name, known), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}" if source else alias.name
                add(full if full in known else _resolve(source, known), node.lineno)
    return targets


def import_graph(modules: dict[str, tuple[Path, ast.Module]]) -> dict[str, dict[str, int]]:
    known = set(modules)
    return {name: imports_of(name, path, tree, known) for name, (path, tree) in modules.items()}


# -- cycles ---------------------------------------------------------------------------------------


def strongly_connected(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's components with more than one member (or a member importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # recursive: the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def a_cycle(graph: dict[str, Iterable[str]], component: list[str]) -> list[str]:
    """One concrete cycle through a component's first member: [a, b, ..., a] (breadth-first, shortest)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def package_graph(graph: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    """Package (:func:`package_of`) to the packages it imports (test modules left out)."""
    out: dict[str, set[str]] = {}
    for name, targets in graph.items():
        if is_test_module(name):
            continue
        top = package_of(name)
        for target in targets:
            other = package_of(target)
            if other != top:
                out.setdefault(top, set()).add(other)
    return out


def describe(graph: dict[str, Iterable[str]], component: list[str]) -> str:
    return " -> ".join(a_cycle(graph, component))


# -- the rules ------------------------------------------------------------------------------------


def long_files(root: Path) -> dict[str, int]:
    out = {}
    for path in python_files(root):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            out[str(path.relative_to(root))] = n
    return out


def sys_path_edits(tree: ast.Module) -> list[int]:
    """Lines that change ``sys.path``: assigned, augmented, a method called, ``from sys import path``."""

    def is_sys_path(node: ast.AST) -> bool:
        while isinstance(node, ast.Subscript):
            node = node.value
        return (isinstance(node, ast.Attribute) and node.attr == "path"
                and isinstance(node.value, ast.Name) and node.value.id == "sys")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            if any(is_sys_path(t) for t in targets):
                lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and is_sys_path(node.func.value)):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(
                a.name == "path" for a in node.names):
            lines.append(node.lineno)
    return sorted(lines)


def without(graph: dict[str, dict[str, int]], allowed: Iterable[str]) -> list[str]:
    """Drop imports of the allowed modules from other packages (with the packages they run on the way)
    out of the graph; the allowed modules that no other package imports (any more)."""
    stale = []
    for target in sorted(allowed):
        parts = target.split(".")
        found = False
        for source, targets in graph.items():
            if package_of(source) == package_of(target) or is_test_module(source) or target not in targets:
                continue
            found = True
            for n in range(1, len(parts) + 1):
                targets.pop(".".join(parts[:n]), None)
        if not found:
            stale.append(target)
    return stale


def cycle_problems(root: Path, allowed: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Imports of test modules and cycles, as messages; and the allowed modules no other package imports."""
    modules = parse(root)
    graph = import_graph(modules)
    stale = without(graph, allowed)
    problems = []
    for name, targets in sorted(graph.items()):
        if not is_test_module(name):
            problems += [f"{name} imports the test module {t} (line {line})"
                         for t, line in targets.items() if is_test_module(t)]
    plain = {k: set(v) for k, v in graph.items()}
    problems += ["module cycle: " + describe(plain, c) for c in strongly_connected(plain)]
    packages = package_graph(graph)
    problems += ["package cycle: " + describe(packages, c) for c in strongly_connected(packages)]
    return problems, stale


# -- the tests ------------------------------------------------------------------------------------


def test_no_python_file_is_over_400_lines() -> None:
    found = long_files(ROOT)
    over = {p: n for p, n in found.items() if p not in ALLOWED_LONG}
    assert not over, f"over {MAX_LINES} lines (split them): {over}"
    stale = sorted(ALLOWED_LONG - set(found))
    assert not stale, f"no longer over {MAX_LINES} lines (or gone): remove from ALLOWED_LONG: {stale}"


def test_nothing_edits_sys_path() -> None:
    edits = {str(path.relative_to(ROOT)): lines for path, tree in parse(ROOT).values()
             if (lines := sys_path_edits(tree))}
    assert not edits, f"sys.path edited (run modules with python -m from the root instead): {edits}"


def test_no_import_cycles() -> None:
    problems, stale = cycle_problems(ROOT, ALLOWED_IMPORTS_OF)
    assert not problems, "\n".join(problems)
    assert not stale, f"no other package imports them: remove from ALLOWED_IMPORTS_OF: {stale}"


def test_stopright_is_read_from_its_distributions_src_folder() -> None:
    modules = parse(ROOT)
    package = ROOT / "stopright" / "src" / "stopright"
    assert modules["stopright"][0] == package / "__init__.py"
    assert modules["stopright.upstream.celery"][0] == package / "upstream" / "celery.py"
    assert not [name for name in modules if name.startswith("stopright.src")]
