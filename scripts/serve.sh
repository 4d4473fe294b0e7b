#!/usr/bin/env bash
# The main job: `vllm serve` of the bundled tiny DeepSeek-V4 (its seeded checkpoint, built once by
# scripts/make_tiny_checkpoint.py) with this plugin auto-loaded in MX mode, one prompt longer than 2048 tokens
# (so the indexer reads its cache), a short one, a text prompt and a chat request, then what the plugin did (its
# log line, indexer rows written, scale statistics and the share of MX rows on the 1e-4 amax floor, which reader
# ran). Stops the server by its pid; exits non-zero if anything failed, or if 1 % or more of the MX rows sit on
# the floor.
#
#   bash scripts/serve.sh                                        # MX mode (configs/indexer-epilog-mx.json)
#   bash scripts/serve.sh --config configs/indexer-epilog-standard.json
#   bash scripts/serve.sh --load-format dummy                    # vLLM's dummy weights (no floor check)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec python "$ROOT/scripts/vllm_serve_client.py" "$@"
