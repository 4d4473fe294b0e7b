"""The golden vectors' expected outputs, computed from docs/SPEC.md with numpy and ml_dtypes alone (no torch, nothing
from this package), so that the vectors stay an independent check of every backend.

    python tests/golden/generate.py            # recompute cache_out/scale_out of every .npz here; fail on a difference
    python tests/golden/generate.py --write    # rewrite cache_out/scale_out in place (after a deliberate SPEC change)

The inputs (`x_bits`, `slot_mapping`, `cache_in`, `scale_in`) are stored data: the seeds that drew them were not kept,
so this script recomputes the outputs from the stored inputs; it does not redraw the inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
GROUP = 128
# SPEC "Quantization of one group": FMAX and EMAX per FP8 format.
FMAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
EMAX = {"float8_e4m3fn": 8, "float8_e5m2": 15}
FP8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}
X_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
MX_FLOOR = np.float32(1e-4)
NAN_CODE = 0x7F


def _exponent(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(e, exact) with v = m · 2^e, m in [0.5, 1): floor(log2 v) = e - 1, and exact where v is a power of two."""
    m, e = np.frexp(v)
    return e.astype(np.int64), m == 0.5


def group_scales(xg: np.ndarray, fp8: str, quant_mode: int, round_scale: bool) -> np.ndarray:
    """SPEC step 1-2 for groups `xg` [..., k] (float32): float32 S (standard) or the e8m0 exponent byte (MX)."""
    finite = np.isfinite(xg)
    amax = np.where(finite, np.abs(xg), np.float32(0)).max(axis=-1).astype(np.float32)
    if quant_mode == 1:
        return (amax / np.float32(FMAX[fp8])).astype(np.float32)
    a = np.maximum(amax, MX_FLOOR)
    if round_scale:
        e, exact = _exponent((a / np.float32(FMAX[fp8])).astype(np.float32))
        log2_s = np.where(exact, e - 1, e)  # ceil(log2): a power of two keeps its own exponent
    else:
        e, _ = _exponent(a)
        log2_s = (e - 1) - EMAX[fp8]  # OCP MX: floor(log2 a) - EMAX
    return (log2_s + 127).astype(np.uint8)


def group_codes(xg: np.ndarray, s: np.ndarray, fp8: str) -> np.ndarray:
    """SPEC step 3: RNE of the float32 quotient into the FP8 format, saturating; NaN -> 0x7F; S = 0 -> 0x00."""
    fmax = np.float32(FMAX[fp8])
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (xg / s[..., None]).astype(np.float32)
    q = np.clip(q, -fmax, fmax)  # ±Inf and finite overflow saturate; NaN stays NaN
    codes = q.astype(FP8[fp8]).view(np.uint8).copy()
    zero_scale = np.broadcast_to((s == 0)[..., None], xg.shape)
    codes[zero_scale & np.isfinite(xg)] = 0x00
    codes[np.isnan(xg)] = NAN_CODE
    return codes


def quantize_rows(x: np.ndarray, fp8: str, quant_mode: int, round_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows x [T, d] (float32) -> codes uint8 [T, d] and scales [T, G] (float32, or uint8 e8m0 bytes for MX)."""
    t, d = x.shape
    codes = np.empty((t, d), np.uint8)
    g_count = -(-d // GROUP)
    scales = np.empty((t, g_count), np.float32 if quant_mode == 1 else np.uint8)
    for g in range(g_count):
        xg = x[:, g * GROUP : min(d, g * GROUP + GROUP)]
        sg = group_scales(xg, fp8, quant_mode, round_scale)
        divisor = sg if quant_mode == 1 else np.ldexp(np.float32(1), sg.astype(np.int64) - 127).astype(np.float32)
        codes[:, g * GROUP : g * GROUP + xg.shape[1]] = group_codes(xg, divisor, fp8)
        scales[:, g] = sg
    return codes, scales


def expected_outputs(z: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """cache_out and scale_out of one stored call: quantize every row, then scatter by slot (-1 skips; last wins)."""
    x = z["x_bits"].view(X_DTYPES[str(z["x_dtype"])]).astype(np.float32)
    fp8 = str(z["cache_dtype"])
    codes, scales = quantize_rows(x, fp8, int(z["quant_mode"]), bool(z["round_scale"]))
    cache, scale = z["cache_in"].copy(), z["scale_in"].copy()
    for row, slot in enumerate(z["slot_mapping"].tolist()):
        if slot >= 0:
            cache[slot] = codes[row]
            scale[slot] = scales[row]
    return cache, scale


def golden_files() -> list[Path]:
    return sorted(HERE.glob("*.npz"))


def differences(path: Path) -> list[str]:
    """Names of the outputs of `path` that this script computes differently ([] when they match byte for byte)."""
    with np.load(path) as npz:
        z = dict(npz)
    cache, scale = expected_outputs(z)
    return [
        name
        for name, want in (("cache_out", cache), ("scale_out", scale))
        if z[name].dtype != want.dtype or z[name].tobytes() != want.tobytes()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite cache_out/scale_out of every .npz")
    args = parser.parse_args(argv)
    bad = 0
    for path in golden_files():
        if args.write:
            with np.load(path) as npz:
                z = dict(npz)
            z["cache_out"], z["scale_out"] = expected_outputs(z)
            np.savez_compressed(path, **z)
            print(f"wrote {path.name}")
            continue
        diff = differences(path)
        bad += bool(diff)
        print(f"{path.name}: {'differs in ' + ', '.join(diff) if diff else 'identical'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
