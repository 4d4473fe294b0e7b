"""HiFloat8 (quant_mode=2) encode as a Triton device function, per docs/hifloat8.md.

Integer operations on the float32 bits only: Triton has no HiF8 dtype, and its CPU interpreter
gets float -> fp8 casts wrong, while int32 adds, shifts, masks and selects behave the same on CUDA
and under TRITON_INTERPRET=1. Each path computes on every lane with its input clamped into its own
domain (so that no shift goes out of range) and `tl.where` keeps the path that applies.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _hif8_mantissa_bits(abs_e):
    # Tapered precision: 3 mantissa bits for |e| <= 3, 2 for 4..7, 1 for 8..15.
    return tl.where(abs_e <= 3, 3, tl.where(abs_e <= 7, 2, 1))


@triton.jit
def hif8_encode(x, SATURATE: tl.constexpr = False):
    """uint8 HiF8 codes of float32 `x`: ties away from zero; NaN -> 0x80; zero results -> 0x00;
    |x| >= 40960 and +/-Inf -> +/-Inf (0x6F/0xEF), or +/-2^15 (0x6E/0xEE) when SATURATE."""
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF

    # Normal range [2^-15, 40960): add half an ulp of the binade's precision and truncate, which
    # rounds ties up in magnitude; a carry into the exponent leaves a zero mantissa, valid at the
    # next binade's precision, so the fields are read from the rounded bits.
    mn = tl.minimum(tl.maximum(mag, 0x38000000), 0x47200000 - 1)
    e = (mn >> 23) - 127
    drop = 23 - _hif8_mantissa_bits(tl.abs(e))
    one = tl.full(mn.shape, 1, tl.int32)
    r = ((mn + (one << (drop - 1))) >> drop) << drop
    er = (r >> 23) - 127
    ae = tl.abs(er)
    k = _hif8_mantissa_bits(ae)
    m = (r >> (23 - k)) & ((one << k) - 1)
    # Exponent field width D (0..4 for |e| = 0, 1, 2..3, 4..7, 8..15), its dot prefix 0001, 001,
    # 01, 10, 11 at the top of the 7 magnitude bits, and the sign-magnitude exponent: sign bit,
    # then |e| less its implicit leading 1.
    d = tl.where(ae == 0, 0, tl.where(ae == 1, 1, tl.where(ae < 4, 2, tl.where(ae < 8, 3, 4))))
    prefix = tl.where(d == 0, 0x08, tl.where(d == 1, 0x10, tl.where(d == 2, 0x20, tl.where(d == 3, 0x40, 0x60))))
    top = tl.maximum(d - 1, 0)
    exp_field = tl.where(d == 0, 0, ((er < 0).to(tl.int32) << top) | (ae - (one << top)))
    normal = prefix | (exp_field << k) | m

    # Denormals are the powers of two 2^-22..2^-16 (code e + 23): 1.f * 2^e rounds up when
    # f >= 1/2; [2^-23, 2^-22) rounds up to 2^-22; rounding up out of 2^-16 reaches 2^-15 (0x7E).
    md = tl.minimum(tl.maximum(mag, 0x34000000), 0x38000000 - 1)
    ed = tl.maximum((md >> 23) - 127 + ((md >> 22) & 1), -22)
    denormal = tl.where(ed >= -15, 0x7E, ed + 23)

    c7 = tl.where(mag < 0x38000000, denormal, normal)
    c7 = tl.where(mag < 0x34000000, 0, c7)
    c7 = tl.where(mag >= 0x47200000, 0x6E if SATURATE else 0x6F, c7)
    code = tl.where(c7 == 0, 0, c7 | ((bits >> 24) & 0x80))
    code = tl.where(mag > 0x7F800000, 0x80, code)
    return code.to(tl.uint8)
