#!/usr/bin/env bash
# Creates (once) and activates .venv with everything the tests and the demo need. Sourced by the other scripts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VIE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.vie-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # The CPU build of torch 2.13.0 (this machine's pip finds the wheel locally); pinned first so that
  # nothing pulls a CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e "$ROOT[test,triton]"
  echo "$want" > "$stamp"
fi
