# Sourced by the other scripts: make .venv exist and hold the project at its current state.
# Re-installs only when pyproject.toml changed, so repeated runs cost nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  if [ "$1" = test ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
  else
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
  fi
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
