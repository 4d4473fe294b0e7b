#!/usr/bin/env bash
# Lowering check for Ascend 950 without an NPU or CANN: compiles every epilog kernel variant the NPU `triton`
# backend can launch, through triton-ascend and BiShengIR, as far as this machine can, and writes
# OUTDIR/summary.json (scripts/ascend_lower.py says which stages and files). Exit 1 if a variant stops early;
# exit 3 if the registry could not supply the compiler (pip's reason printed).
#
# Sets up once, cached: a venv of its own (triton-ascend installs the module `triton`, so it cannot share one
# with upstream Triton) under ${VLLM_INDEXER_EPILOG_CACHE:-~/.cache/vllm_indexer_epilog}, keyed by the pins, and
# a `bishengir-compile` shim onto ascendnpu-ir's bishengir-compile-a5 that saves BiShengIR's intermediate IR.
# No torch in it: compiling needs none (launching would need torch_npu, i.e. CANN).
set -euo pipefail
if [ $# -ne 1 ]; then echo "usage: $0 OUTDIR" >&2; exit 2; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$(mkdir -p "$1" && cd "$1" && pwd)"
PINS=(triton-ascend==3.2.0 ascendnpu-ir==1.2.0 pybind11==3.1.0)
PYTHON="${PYTHON:-python3}"
CACHE="${VLLM_INDEXER_EPILOG_CACHE:-$HOME/.cache/vllm_indexer_epilog}"
KEY="$(printf '%s\n' "${PINS[@]}" "$("$PYTHON" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-12)"
VENV="$CACHE/ascend-check-venv-$KEY"

if [ ! -f "$VENV/.ready" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    if ! "$VENV/bin/pip" install --disable-pip-version-check -q "${PINS[@]}" > "$VENV.pip.log" 2>&1; then
        echo "ascend_check: pip could not install ${PINS[*]}:" >&2
        grep -v "^WARNING: Location" "$VENV.pip.log" | tail -n 5 >&2
        rm -rf "$VENV"
        exit 3
    fi
    A5="$("$VENV/bin/python" -c 'import ascendnpuir, pathlib; print(pathlib.Path(ascendnpuir.__file__).parent / "bin" / "bishengir-compile-a5")')"
    mkdir -p "$VENV/shim"
    # triton-ascend runs `bishengir-compile` from PATH (the A5 build is named -a5); --save-temps keeps
    # module.hivm.opt.mlir, the last IR before CANN's hivmc-a5.
    cat > "$VENV/shim/bishengir-compile" <<SHIM
#!/usr/bin/env bash
exec "$A5" "\$@" \${ASCEND_CHECK_SAVE_TEMPS:+--save-temps=\$ASCEND_CHECK_SAVE_TEMPS}
SHIM
    chmod +x "$VENV/shim/bishengir-compile"
    touch "$VENV/.ready"
fi

export PATH="$VENV/shim:$PATH"
unset TRITON_INTERPRET PYTHONPATH  # a compile, not the interpreter (the test venv's setting must not leak in)
TRITON_CACHE_DIR="$(mktemp -d)"  # a fresh cache: every variant really compiles
export TRITON_CACHE_DIR
trap 'rm -rf "$TRITON_CACHE_DIR"' EXIT
"$VENV/bin/python" "$ROOT/scripts/ascend_lower.py" "$OUTDIR" ${ASCEND_CHECK_JOBS:+--jobs "$ASCEND_CHECK_JOBS"}
