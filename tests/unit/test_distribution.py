"""The stopright distribution's folder, read without building it: what it declares, and how it is found.

Built and installed for real into fresh venvs: tests/e2e/test_distribution_install.py.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import stopright
from tests.procset import ROOT

DIST = ROOT / "stopright"
PACKAGE = DIST / "src" / "stopright"
EXAMPLES = {"foreign": ROOT / "examples" / "foreign", "flask": ROOT / "examples" / "flask"}
#: A requirement line ``name[extras]==version  # comment``, or a path ``../x[extras]``.
#: What the [gunicorn] extra is for: the modules a gunicorn process loads.
GUNICORN_MODULES = ("stopright.gunicorn_hooks", "stopright.upstream.gunicorn",
                    "stopright.upstream.checks_gunicorn")
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)(\[[^\]]*\])?==(?P<version>\S+)$")
PATH = re.compile(r"^(?P<path>\.{1,2}/\S*?)(\[(?P<extras>[^\]]*)\])?$")


def project() -> dict:
    with open(DIST / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def declared_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules stopright's files import that are neither the standard library nor its own."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"stopright"}:
                out.setdefault(top, set()).add(str(path.relative_to(PACKAGE)))
    return out


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split(" #", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def repository_pins() -> dict[str, str]:
    pins = {}
    for path in ROOT.glob("requirements*.txt"):
        for line in requirement_lines(path):
            if match := PIN.match(line):
                pins[match["name"].lower()] = match["version"]
    return pins


# -- where `import stopright` lands ------------------------------------------------------------


def test_import_stopright_from_the_root_finds_the_installed_package_not_the_distributions_folder() -> None:
    # gunicorn, celery and pytest put the working directory first; there `stopright/` is a folder with
    # no __init__.py, which would be a namespace package if the installed one were not found after it.
    assert DIST.is_dir() and not (DIST / "__init__.py").exists()
    code = ("import json, sys, stopright; print(json.dumps([sys.path[0], stopright.__file__, "
            "stopright.__spec__.origin, list(stopright.__path__)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, file, origin, paths = json.loads(out.stdout)
    assert first == ""  # the working directory, the root
    assert file == origin == str(PACKAGE / "__init__.py")
    assert paths == [str(PACKAGE)]  # a regular package: one directory, where a namespace package lists each


def test_the_tests_import_the_same_package() -> None:
    assert stopright.__file__ == str(PACKAGE / "__init__.py")
    assert stopright.__spec__ is not None and stopright.__spec__.origin == stopright.__file__


# -- what the distribution declares --------------------------------------------------------------


def test_the_version_is_the_changelogs_latest_entry() -> None:
    entries = re.findall(r"^## (\S+)", (DIST / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert entries and entries[0] == stopright.__version__
    assert project()["dynamic"] == ["version"]  # read from __init__.py by the build backend, not repeated


def test_every_third_party_import_is_a_declared_dependency_and_gunicorn_is_the_extras() -> None:
    meta = project()
    required = {declared_name(r) for r in meta["dependencies"]}
    extras = {name: {declared_name(r) for r in reqs} for name, reqs in meta["optional-dependencies"].items()}
    imports = third_party_imports()
    assert required == {"celery", "kombu", "billiard", "psutil"}
    assert extras == {"gunicorn": {"gunicorn"}}
    assert set(imports) == required | extras["gunicorn"], imports


def test_without_the_extra_only_the_gunicorn_modules_need_gunicorn() -> None:
    # A Celery-only app installs stopright without [gunicorn]: every other module must load without it.
    code = ("import pkgutil, importlib, sys, stopright\n"
            "names = [m.name for m in pkgutil.walk_packages(stopright.__path__, 'stopright.')]\n"
            f"names = [n for n in names if n not in {GUNICORN_MODULES!r}]\n"
            "[importlib.import_module(n) for n in names]\n"
            "print(len(names), 'gunicorn' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    count, loaded = out.stdout.split()
    assert int(count) > 10 and loaded == "False", out.stdout


def test_every_dependency_is_a_range_that_admits_the_repositorys_pin() -> None:
    pins = repository_pins()
    meta = project()
    for requirement in [*meta["dependencies"], *meta["optional-dependencies"]["gunicorn"]]:
        name = declared_name(requirement)
        bounds = dict(re.findall(r"(>=|<)\s*([0-9][0-9.]*)", requirement))
        assert set(bounds) == {">=", "<"}, f"{requirement}: a lower and an upper bound"
        version = tuple(int(p) for p in pins[name].split("."))
        low, high = (tuple(int(p) for p in bounds[op].split(".")) for op in (">=", "<"))
        assert low <= version < high, requirement


def test_the_package_is_marked_typed_and_licensed() -> None:
    assert (PACKAGE / "py.typed").exists()
    assert "MIT License" in (DIST / "LICENSE").read_text() and project()["license"] == "MIT"


# -- the examples install it as a user does --------------------------------------------------------


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_an_example_names_stopright_by_path_and_pins_the_rest_as_the_repository(example: str) -> None:
    directory = EXAMPLES[example]
    lines = requirement_lines(directory / "requirements.txt")
    paths = [match for line in lines if (match := PATH.match(line))]
    assert len(paths) == 1, lines
    assert (directory / paths[0]["path"]).resolve() == DIST  # pip reads it from the example's directory
    assert "gunicorn" in (paths[0]["extras"] or "").split(",")  # its Procfile runs stopright.gunicorn_hooks
    assert "stopright.gunicorn_hooks" in (directory / "Procfile").read_text()
    pins = repository_pins()
    others = [line for line in lines if not PATH.match(line)]
    for line in others:
        match = PIN.match(line)
        assert match, f"{line}: pinned, as every requirement of the repository"
        assert pins.get(match["name"].lower()) == match["version"], f"{line}: not the repository's pin"
