"""Find a CPython of a given version on this machine: the per-version quick start and .ci/run.

A candidate counts only if it runs and says it is that version: pyenv's shims
on PATH exist for every installed version but refuse one that is not selected.
Looked at, in order: ``PYTHON_3_13`` (for 3.13; likewise for the others),
``python3.13`` on PATH, pyenv's versions (``$PYENV_ROOT``, else ``~/.pyenv``),
then /usr/local/bin and /usr/bin.

``python -m tests.pythons 3.13`` prints the path, or says how to get one and exits 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def running() -> str:
    """The running interpreter's version, "3.11"."""
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _variable(version: str) -> str:
    return f"PYTHON_{version.replace('.', '_')}"


#: The versions scripts/lib/venv.sh accepts (every pinned requirement has wheels for them).
SUPPORTED = ("3.11", "3.12", "3.13")


def _is_version(python: str, version: str) -> bool:
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def _candidates(version: str) -> list[str]:
    found = [os.environ.get(_variable(version), ""), shutil.which(f"python{version}") or ""]
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found += [str(p) for p in sorted((pyenv_root / "versions").glob(f"{version}.*/bin/python{version}"),
                                     reverse=True)]
    found += [f"/usr/local/bin/python{version}", f"/usr/bin/python{version}"]
    return [c for c in found if c]


def find_python(version: str) -> str | None:
    """A working interpreter of ``version`` ("3.13"), or None."""
    if running() == version:
        return sys.executable
    return next((c for c in _candidates(version) if _is_version(c, version)), None)


def how_to_get(version: str) -> str:
    return (f"no Python {version} found (looked at {_variable(version)}, python{version} on PATH, "
            f"pyenv's versions, /usr/local/bin, /usr/bin): install it (Debian 13: apt-get install "
            f"python{version} python{version}-venv; or pyenv install {version}) or set "
            f"{_variable(version)}=/path/to/python{version}")


if __name__ == "__main__":
    wanted = sys.argv[1]
    python = find_python(wanted)
    if python is None:
        sys.exit(how_to_get(wanted))
    print(python)
