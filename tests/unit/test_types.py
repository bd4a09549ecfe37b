"""``mypy --strict`` passes on stopright and on a user's module that uses its whole public API.

The settings are stopright's (stopright/pyproject.toml, ``[tool.mypy]``); the user's module is
tests/typecheck/, never run. A name the lazy exports hide from type checkers, or an annotation
that no longer holds, fails here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import stopright

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "stopright" / "pyproject.toml"
INIT = ROOT / "stopright" / "src" / "stopright" / "__init__.py"


def mypy(*targets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(CONFIG), *targets],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_stopright_passes_mypy_strict() -> None:
    result = mypy()  # the config's packages: stopright
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout, result.stdout


def test_a_user_module_of_the_whole_api_passes_mypy_strict() -> None:
    result = mypy("tests/typecheck")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in 2 source files" in result.stdout, result.stdout  # the app and its gunicorn.conf.py


def test_type_checkers_see_every_lazy_export() -> None:
    """Each name of ``__all__`` is imported under ``if TYPE_CHECKING:``, from where it loads at run time."""
    seen = {}
    for node in ast.walk(ast.parse(INIT.read_text())):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imported in ast.walk(node):
                if isinstance(imported, ast.ImportFrom):
                    for alias in imported.names:
                        seen[alias.asname or alias.name] = (imported.module, alias.name)
    exports = stopright._EXPORTS
    assert seen == exports, f"TYPE_CHECKING imports {seen} != the lazy exports {exports}"
    assert stopright.__all__ == sorted(exports), "__all__ is not the lazy exports' names, sorted"
