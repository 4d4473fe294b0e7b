#!/usr/bin/env bash
# The main job: `vllm serve` of the bundled tiny DeepSeek-V4 (dummy weights) with this plugin auto-loaded in
# MX mode, one prompt longer than 2048 tokens (so the indexer reads its cache) and one short one, then what
# the plugin did (its log line, indexer rows written, scale statistics, which reader ran). Stops the server
# by its pid; exits non-zero if anything failed.
#
#   bash scripts/serve.sh                                        # MX mode (configs/indexer-epilog-mx.json)
#   bash scripts/serve.sh --config configs/indexer-epilog-standard.json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec python "$ROOT/scripts/vllm_serve_client.py" "$@"
