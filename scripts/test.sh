#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (CPU kernel, reference, Triton under its interpreter).
# Arguments go to pytest: `bash scripts/test.sh -m "not e2e and not network and not slow"` is the fast set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m pytest -q -rs "$@"
