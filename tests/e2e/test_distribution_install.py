"""stopright as a user installs it: its folder and its built wheel, each into a fresh venv, on each Python.

The wheel is built once (``pip wheel --no-deps``; the build backend is pinned in
stopright/pyproject.toml). For each supported Python found (tests/pythons.py; a
version named in ``REQUIRE_PYTHONS`` must be there, as for the quick start) one
venv gets ``pip install "./stopright[gunicorn]"``, is checked, loses stopright
and gets the wheel, checked the same way: stopright installed only its own
files, nothing of the demo is in site-packages, ``__version__`` is the
metadata's, ``py.typed`` is there, ``pip check`` is clean, and the package and
its gunicorn hooks import from outside the checkout. pip's cache is shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import stopright
from tests.procset import ROOT
from tests.pythons import SUPPORTED, find_python, how_to_get

DIST = ROOT / "stopright"
#: The demo's, the tools' and the repository's own top-level names: none may be installed.
DEMO = {"app", "core", "jobs", "tasks", "broker", "tools", "tests", "examples", "stopcheck", "bench",
        "deploy", "scripts", "var", "gunicorn.conf"}
PIP_SECONDS = 300  # an install may fetch the dependencies from the index
#: Run by the venv's Python from a directory outside the checkout: what got installed, and from where.
PROBE = """\
import importlib.metadata as md, json, pathlib, sys, sysconfig
import stopright, stopright.gunicorn_hooks
site = pathlib.Path(sysconfig.get_paths()["purelib"])
dist = md.distribution("stopright")
print(json.dumps({
    "version": stopright.__version__, "metadata": dist.version, "file": stopright.__file__,
    "site": str(site), "files": [str(f) for f in dist.files],
    "typed": (pathlib.Path(stopright.__file__).parent / "py.typed").is_file(),
    "top": sorted(p.name for p in site.iterdir()),
    "owned": sorted({f.parts[0] for d in md.distributions() for f in d.files or ()}),
    "path": sys.path,
}))
"""


def run(command: list[str], cwd: Path, timeout: float = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(command, cwd=cwd, env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{command}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def top_name(entry: str) -> str:
    """A site-packages entry's import name: ``app``, ``app.py``, ``app-1.0.dist-info`` -> ``app``."""
    return entry.split("-", 1)[0].removesuffix(".py").removesuffix(".pth")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(DIST)],
        cwd=out, timeout=PIP_SECONDS)
    (built,) = out.glob("stopright-*.whl")
    return built


def test_the_wheel_holds_stopright_alone(wheel: Path) -> None:
    info = f"stopright-{stopright.__version__}.dist-info"
    assert wheel.name == f"stopright-{stopright.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"stopright", info}, names
    package = {name for name in names if name.startswith("stopright/")}
    root = DIST / "src" / "stopright"
    source = {f"stopright/{p.relative_to(root)}" for p in root.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert package == source  # every file of the package, py.typed included, and nothing else
    assert f"{info}/licenses/LICENSE" in names


def check_install(venv: Path, cwd: Path, how: str) -> None:
    """The checks after one install (``how``: for the messages)."""
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "check"], cwd=cwd)
    seen = json.loads(run([python, "-c", PROBE], cwd=cwd))
    site = Path(seen["site"])
    assert seen["version"] == seen["metadata"] == stopright.__version__, (how, seen["version"])
    assert Path(seen["file"]) == site / "stopright" / "__init__.py", (how, seen["file"])
    assert seen["typed"], how
    info = f"stopright-{stopright.__version__}.dist-info"
    assert {Path(f).parts[0] for f in seen["files"]} == {"stopright", info}, (how, seen["files"])
    assert not {top_name(entry) for entry in seen["top"]} & DEMO, (how, seen["top"])
    unowned = [e for e in seen["top"] if e not in seen["owned"] and e != "__pycache__"]
    assert not unowned, (how, unowned)  # nothing a build left behind, no link to the checkout
    assert not [p for p in seen["path"] if p.startswith(str(ROOT))], (how, seen["path"])


@pytest.mark.timeout(3 * PIP_SECONDS)
@pytest.mark.parametrize("version", SUPPORTED)
def test_the_folder_and_the_wheel_install_stopright_alone(tmp_path: Path, wheel: Path, version: str) -> None:
    python = find_python(version)
    if python is None:
        if version in os.environ.get("REQUIRE_PYTHONS", "").split():
            pytest.fail(f"REQUIRE_PYTHONS names {version}, but {how_to_get(version)}")
        pytest.skip(how_to_get(version))
    venv = tmp_path / "venv"
    run([python, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    run([*pip, "install", "--quiet", f"{DIST}[gunicorn]"], cwd=tmp_path, timeout=PIP_SECONDS)
    check_install(venv, tmp_path, f"pip install ./stopright on {version}")
    run([*pip, "uninstall", "--yes", "stopright"], cwd=tmp_path)
    run([*pip, "install", "--quiet", f"{wheel}[gunicorn]"], cwd=tmp_path, timeout=PIP_SECONDS)
    check_install(venv, tmp_path, f"pip install {wheel.name} on {version}")
