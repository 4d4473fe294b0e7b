"""Compile every epilog kernel variant the NPU `triton` backend can launch for Ascend 950, as far as this
machine can (no NPU, no CANN), and write OUTDIR/summary.json. Run by scripts/ascend_check.sh inside
triton-ascend's own venv (triton-ascend installs the module `triton`, so it cannot share the test venv).

The kernel source is loaded by path (vllm_indexer_epilog/backends/triton_epilog_jit.py imports only Triton):
this venv has neither torch nor the package. The constants below mirror op/spec.py and the launcher's
(backends/triton_kernel.py `launch`); tests/backends/test_ascend_lowering.py checks they agree.

Stages, in order (what each leaves in OUTDIR/<variant>/):
  ttir       kernel.ttir.mlir        Triton IR after triton-ascend's TTIR passes
  ttadapter  kernel.ttadapter.mlir   linalg/HIVM dialects from triton-adapter-opt
  hivm       module.hivm.opt.mlir    the end of BiShengIR's HIVM pipeline (bishengir-compile --save-temps):
                                     dav-c310 vector intrinsics, before hivmc-a5 (CANN) makes an object
  npubin     kernel.npubin           the device binary (only where CANN's hivmc-a5 is on PATH)
Exit status 1 if any variant stops before EXPECTED_STAGE (or the argument --expect).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SOURCE = ROOT / "vllm_indexer_epilog" / "backends" / "triton_epilog_jit.py"
TARGET = "Ascend950PR_9599"
OPTIONS = {"compile_on_910_95": True, "multibuffer": False, "enable_auto_bind_sub_block": False,
           "enable_select_analysis": True}
STAGES = ("none", "ttir", "ttadapter", "hivm", "npubin")
STAGE_FILES = {"ttir": "kernel.ttir.mlir", "ttadapter": "kernel.ttadapter.mlir", "hivm": "module.hivm.opt.mlir",
               "npubin": "kernel.npubin"}
EXPECTED_STAGE = "hivm"

# (mantissa bits, exponent bias, largest finite code, FMAX, EMAX) as in op/spec.py FP8_FORMATS.
FP8 = {"e4m3fn": (3, 7, 0x7E, 448.0, 8), "e5m2": (2, 15, 0x7B, 57344.0, 15)}
X_FMT = {"bf16": (1, "*i16"), "fp16": (2, "*i16")}
SLOT = {"int32": "*i32", "int64": "*i64"}
NAN_CODE = 0x7F
MX_AMAX_FLOOR = 1e-4
GROUP = 128
MAX_DIV_ULPS = 2
# MODE: 0 standard, 1 MX round_scale=True, 2 MX round_scale=False (as the launcher maps quant_mode/round_scale).
MODES = {"standard": (1, True, 0), "mx_ceil": (0, True, 1), "mx_floor": (0, False, 2)}
# Layouts: contiguous cache/scale; the packed-block pair; the packed page laid out for standard mode
# written in MX mode (float32 scale slots holding 2^e: the vllm-ascend DeepSeek-V4 hook's page).
LAYOUTS = {"contiguous": (False, False), "packed": (True, False), "packed_mx_f32_scale": (True, True)}


def f32_bits(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", v))[0]


def variants() -> list[dict]:
    out = []

    def add(mode: str, x: str, slot: str, layout: str, fp8: str = "e4m3fn", block_p: int = 32) -> None:
        quant_mode, round_scale, _ = MODES[mode]
        out.append({"quant_mode": quant_mode, "round_scale": round_scale, "mode": mode, "x_dtype": x,
                    "slot_dtype": slot, "layout": layout, "fp8": fp8, "block_p": block_p})

    for mode in MODES:
        for x in X_FMT:
            for slot in SLOT:
                for layout in LAYOUTS:
                    if layout == "packed_mx_f32_scale" and mode == "standard":
                        continue  # standard mode's scales are float32 anyway: that is "packed"
                    add(mode, x, slot, layout)
        # The other FP8 format and the decode-sized tile (launch_config's BLOCK_P = 8), once per mode.
        add(mode, "bf16", "int64", "contiguous", fp8="e5m2")
        add(mode, "bf16", "int64", "packed", block_p=8)
    return out


def variant_name(v: dict) -> str:
    return f"{v['mode']}-{v['x_dtype']}-{v['slot_dtype']}-{v['layout']}-{v['fp8']}-b{v['block_p']}"


def load_kernel():
    spec = importlib.util.spec_from_file_location("triton_epilog_jit", KERNEL_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.MAX_DIV_ULPS == MAX_DIV_ULPS, "scripts/ascend_lower.py is out of date with the kernel"
    return module


# An LLVM tool that crashed (a segfault in triton-adapter-opt was seen once on a loaded 2-core machine, and the
# same TTIR then lowered cleanly three times): worth one more try, recorded in the summary; a compile error
# that reproduces still fails the check.
_TOOL_CRASH = ("PLEASE submit a bug report", "Stack dump:")


def compile_with_retry(v: dict, outdir: str) -> dict:
    """`compile_variant`, tried once more when a compiler tool crashed before the expected stage."""
    result = compile_variant(v, outdir)
    error_file = Path(outdir) / result["name"] / "error.txt"
    crashed = error_file.exists() and any(mark in error_file.read_text() for mark in _TOOL_CRASH)
    if STAGES.index(result["stage"]) < STAGES.index(EXPECTED_STAGE) and crashed:
        first = result["stopped_by"]
        result = compile_variant(v, outdir)
        result["retried_after_tool_crash"] = first
    return result


def compile_variant(v: dict, outdir: str) -> dict:
    """One compile in its own process (the bishengir shim reads ASCEND_CHECK_SAVE_TEMPS from the environment)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = variant_name(v)
    work = Path(outdir) / name
    shutil.rmtree(work, ignore_errors=True)
    scratch = work / "scratch"
    scratch.mkdir(parents=True)
    os.environ["ASCEND_CHECK_SAVE_TEMPS"] = str(scratch / "bishengir")
    # triton-ascend writes each stage's input into a TemporaryDirectory and deletes it: keep them instead.
    made: list[str] = []

    def keep_dir(*args, **kwargs):
        path = tempfile.mkdtemp(dir=scratch)
        made.append(path)
        return contextlib.nullcontext(path)

    tempfile.TemporaryDirectory = keep_dir

    kernel = load_kernel()
    _, _, mode = MODES[v["mode"]]
    packed, mx_f32 = LAYOUTS[v["layout"]]
    mant, bias, max_code, fmax, emax = FP8[v["fp8"]]
    x_fmt, x_ptr = X_FMT[v["x_dtype"]]
    scale_ptr = "*i32" if mode == 0 or mx_f32 else "*u8"
    signature = {"x_ptr": x_ptr, "slot_ptr": SLOT[v["slot_dtype"]], "cache_ptr": "*u8", "scale_ptr": scale_ptr,
                 # Python ints below 2^31, as a launch passes them, are i32 to Triton.
                 "n_pairs": "i32", "n_slots": "i32", "D": "i32", "G": "i32", "block_size": "i32",
                 "code_block_stride": "i32", "scale_block_stride": "i32"}
    constants = dict(MANT=mant, BIAS=bias, MAX_CODE=max_code, FMAX_BITS=f32_bits(fmax), EMAX=emax, NAN=NAN_CODE,
                     FLOOR_BITS=f32_bits(MX_AMAX_FLOOR), MODE=mode, X_FMT=x_fmt, MX_F32_SCALE=mx_f32,
                     BLOCK_P=v["block_p"], GROUP=GROUP, PACKED=packed, MAX_DIV_ULPS=MAX_DIV_ULPS)
    error = ""
    binary = None
    started = time.monotonic()
    try:
        compiled = triton.compile(ASTSource(kernel.epilog_kernel, signature, constants=constants),
                                  target=GPUTarget("npu", TARGET, 0), options=dict(OPTIONS))
        binary = compiled.asm.get("npubin")
    except Exception as exc:  # the expected end without CANN: "Cannot find hivmc-a5 under $PATH"
        error = "".join(traceback.format_exception_only(type(exc), exc))
    seconds = round(time.monotonic() - started, 1)

    found = {}
    for path in sorted(scratch.rglob("*")):
        for stage, file in STAGE_FILES.items():
            if path.name == file and stage not in found:
                found[stage] = path
    if binary is not None:
        (work / STAGE_FILES["npubin"]).write_bytes(binary)
        found["npubin"] = work / STAGE_FILES["npubin"]
    stage = "none"
    for s in STAGES[1:]:
        if s in found:
            stage = s
    ir = None
    for s, path in found.items():
        target = work / STAGE_FILES[s]
        if path != target:
            shutil.copyfile(path, target)
        if s == stage:
            ir = str(target.relative_to(outdir))
    if stage == "hivm":
        float_counts = float_ops((work / STAGE_FILES["hivm"]).read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    stop = next((line for line in lines if "hivmc" in line), lines[-1] if lines else "")
    result = {k: v[k] for k in ("quant_mode", "round_scale", "x_dtype", "slot_dtype", "layout", "fp8", "block_p")}
    result.update(name=name, stage=stage, ir=ir, seconds=seconds, stopped_by=stop if binary is None else None)
    if stage == "hivm":
        result["hivm_float_ops"] = float_counts
    if stage == "none" or (binary is None and "hivmc" not in error):
        (work / "error.txt").write_text(error)
    return result


def float_ops(hivm: str) -> dict[str, int]:
    """Vector intrinsics with an f32 vector result in the HIVM module: shows which float ops reach the unit."""
    import re

    counts: dict[str, int] = {}
    for op in re.findall(r'"hivm_regbaseintrins\.intr\.hivm\.([a-z0-9_.]+)"\([^)]*\) : \([^)]*\) -> vector<\d+xf32>',
                         hivm):
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("triton-ascend", "ascendnpu-ir"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--expect", choices=STAGES[1:], default=EXPECTED_STAGE)
    args = parser.parse_args()
    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    todo = variants()
    started = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_with_retry, todo, [str(outdir)] * len(todo)))
    summary = {"target": TARGET, "options": OPTIONS, "versions": versions(), "expected_stage": args.expect,
               "seconds": round(time.monotonic() - started, 1), "variants": results}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    short = [r for r in results if STAGES.index(r["stage"]) < STAGES.index(args.expect)]
    for r in results:
        print(f"{r['name']:60s} {r['stage']:10s} {r['seconds']:6.1f}s  {r['stopped_by'] or ''}")
    print(f"{len(results)} variants, {len(short)} short of {args.expect}; {summary['seconds']} s; {outdir / 'summary.json'}")
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
