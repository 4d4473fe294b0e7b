#!/usr/bin/env bash
# Installs what is missing, then quantizes a realistic indexer batch into a paged cache and reports.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m vllm_indexer_epilog.demo "$@"
