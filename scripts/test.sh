#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (CPU kernel, reference, Triton under its interpreter).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m pytest -q -rs "$@"
