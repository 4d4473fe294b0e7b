#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU as it comes (torch, Triton, pytest, hypothesis,
# matplotlib; no vLLM, no internet, nothing installed): the whole test suite on the GPU, then the GPU
# benchmark. Writes tests.log, bench.log, bench_gpu.json, bench_gpu.md and the plots into OUTDIR.
#   bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, benchmark exit $bench_rc" | tee -a "$OUT/tests.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
