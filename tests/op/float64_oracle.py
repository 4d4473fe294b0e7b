"""An independent float64 model of SPEC.md, sharing no code with the package.

Encoding is a nearest-value search over the decoded fp8 table (ties to the even code); scales and
quotients are computed in float64 and rounded to float32 once, which equals the correctly rounded
float32 operation.
"""

from __future__ import annotations

import math

import numpy as np

FORMATS = {  # name: (mantissa bits, exponent bias, FMAX, EMAX)
    "float8_e4m3fn": (3, 7, 448.0, 8),
    "float8_e5m2": (2, 15, 57344.0, 15),
}


def fp8_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative finite values (float64, ascending) and their codes."""
    m, bias, fmax, _ = FORMATS[name]
    vals, codes = [], []
    for code in range(0x80):
        e, f = code >> m, code & ((1 << m) - 1)
        v = (f / (1 << m)) * 2.0 ** (1 - bias) if e == 0 else (1 + f / (1 << m)) * 2.0 ** (e - bias)
        if v <= fmax:
            vals.append(v)
            codes.append(code)
    return np.array(vals), np.array(codes)


def encode(q: np.ndarray, name: str) -> np.ndarray:
    """float32 quotients -> fp8 bytes: nearest table value, ties to even code, saturating, NaN -> 0x7F."""
    vals, codes = fp8_table(name)
    q = q.astype(np.float64)
    a = np.abs(np.nan_to_num(q, nan=0.0, posinf=np.inf, neginf=-np.inf))
    a = np.minimum(a, vals[-1])
    hi = np.clip(np.searchsorted(vals, a), 0, len(vals) - 1)
    lo = np.clip(hi - 1, 0, len(vals) - 1)
    d_lo, d_hi = a - vals[lo], vals[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    out = np.where(pick_hi, codes[hi], codes[lo]).astype(np.uint8)
    out = out | np.where(np.signbit(q), 0x80, 0).astype(np.uint8)
    return np.where(np.isnan(q), 0x7F, out).astype(np.uint8)


def quantize(x: np.ndarray, name: str, quant_mode: int, round_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows x (float32 values, [R, d]) -> codes [R, d] uint8 and scales [R, G] (float32 or e8m0 bytes)."""
    _, _, fmax, emax = FORMATS[name]
    rows, d = x.shape
    g = math.ceil(d / 128)
    codes = np.zeros((rows, d), np.uint8)
    scales = np.zeros((rows, g), np.float32 if quant_mode == 1 else np.uint8)
    x64 = x.astype(np.float64)
    for r in range(rows):
        for j in range(g):
            seg = x64[r, 128 * j : 128 * j + 128]
            fin = seg[np.isfinite(seg)]
            a = float(np.max(np.abs(fin))) if fin.size else 0.0
            if quant_mode == 1:
                s = np.float32(a / fmax)
                with np.errstate(all="ignore"):
                    q = (seg / np.float64(s)).astype(np.float32)
                c = encode(q, name)
                if s == 0:
                    c = np.where(np.isfinite(seg), 0, c)
                scales[r, j] = s
            else:
                a = max(a, float(np.float32(1e-4)))
                if round_scale:
                    mant, ex = math.frexp(float(np.float32(a / fmax)))  # ratio = mant * 2^ex, mant in [0.5, 1)
                    e = ex - 1 if mant == 0.5 else ex
                else:
                    e = math.frexp(a)[1] - 1 - emax
                q = (seg * 2.0 ** (-e)).astype(np.float32)
                c = encode(q, name)
                scales[r, j] = e + 127
            codes[r, 128 * j : 128 * j + 128] = c
    return codes, scales
