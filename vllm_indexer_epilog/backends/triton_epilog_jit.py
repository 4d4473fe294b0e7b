"""The epilog's Triton kernel source, one for CUDA and Ascend (triton-ascend); imports nothing but Triton.

No torch import, so scripts/ascend_lower.py can load this file by path in triton-ascend's own venv (where torch
and this package's other modules need not exist). The launchers live in triton_kernel.py (CUDA, and the CPU
interpreter) and npu.py (torch_npu).

Exactness without IEEE division or subnormals (docs/ascend-triton.md has the proof sketch). Ascend's vector
`Div` is documented as within 1 ulp and flushing subnormals, so nothing here relies on a correctly rounded
division, and no float op sees or makes a subnormal:
- x is loaded as raw bits and widened to float32 bits with integer ops (an FTZ unit's fp16/bf16 -> fp32 cast
  could flush subnormal inputs); amax is an integer max of magnitudes.
- every quotient the contract asks for (amax / FMAX, x / S, floored amax / FMAX) is taken between two
  mantissas in [1, 2): `_div_bracket` gets a reciprocal from the unit (any error up to a few ulps is fine),
  refines it once with an FMA residual, and then finds c <= a/b < next(c) and where a/b lies against c's
  midpoint from the signs of two FMA residuals, which are exact there. Only the FMA's single rounding of a
  normal result is relied on.
- `_compose` then rounds that exactly known quotient, times 2^e, to float32 bits in integer arithmetic, float32
  subnormal results included (a standard-mode scale may be one), and the FP8 encode is integer as before.
- scales are stored as int32 bits (a float store path could flush a subnormal scale).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rne_shift(t, sh):
    # Round-to-nearest-even of t / 2^sh for t >= 0, 1 <= sh <= 30.
    return (t + ((1 << (sh - 1)) - 1) + ((t >> sh) & 1)) >> sh


@triton.jit
def encode_fp8(
    bits, MANT: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr, FMAX_BITS: tl.constexpr, NAN: tl.constexpr
):
    """FP8 byte (in an int32) of the float32 whose bits are `bits`: nearest-even, saturating, NaN -> NAN."""
    mag = bits & 0x7FFFFFFF
    sign = (bits >> 24) & 0x80
    DROP: tl.constexpr = 23 - MANT
    normal = _rne_shift(mag, DROP) - ((127 - BIAS) << MANT)
    shift = tl.minimum(tl.maximum(151 - BIAS - MANT - (mag >> 23), 1), 25)
    mant = (mag & 0x7FFFFF) | 0x800000
    code = tl.where(mag < ((128 - BIAS) << 23), _rne_shift(mant, shift), normal)
    code = tl.where(mag > FMAX_BITS, MAX_CODE, code) | sign
    return tl.where(mag > 0x7F800000, NAN, code)


@triton.jit
def widen_bits(h, X_FMT: tl.constexpr):
    """float32 bits of x's elements, loaded as raw bits (X_FMT 0: float32, 1: bfloat16, 2: float16)."""
    if X_FMT == 0:
        return h
    elif X_FMT == 1:
        return (h.to(tl.int32) & 0xFFFF) << 16
    else:
        h32 = h.to(tl.int32) & 0xFFFF
        e5 = (h32 >> 10) & 0x1F
        m10 = h32 & 0x3FF
        sign = (h32 & 0x8000) << 16
        normal = ((e5 + 112) << 23) | (m10 << 13)
        special = 0x7F800000 | (m10 << 13)
        # A float16 subnormal m10 * 2^-24 is a float32 normal: float(m10) is exact, and its exponent field
        # lowered by 24 divides it by 2^24 without a float op.
        sub = tl.where(m10 == 0, 0, m10.to(tl.float32).to(tl.int32, bitcast=True) - (24 << 23))
        return sign | tl.where(e5 == 0x1F, special, tl.where(e5 == 0, sub, normal))


@triton.jit
def _decompose(mag):
    """A positive finite non-zero float32 magnitude (bits) as (m, e): value = m * 2^e, m a float in [1, 2)."""
    expf = mag >> 23
    # A subnormal's fraction field f is the integer f * 2^-149: float(f) is exact and normal.
    f = (mag & 0x7FFFFF).to(tl.float32).to(tl.int32, bitcast=True)
    sub = expf == 0
    frac = tl.where(sub, f & 0x7FFFFF, mag & 0x7FFFFF)
    e = tl.where(sub, (f >> 23) - 127 - 149, expf - 127)
    return (frac | (127 << 23)).to(tl.float32, bitcast=True), e


@triton.jit
def _div_bracket(a, b):
    """For a, b in [1, 2): (c, d) with c <= a/b < next(c) (c a float in (1/2, 2)) and d where a/b lies:
    0 equal to c; 1, 2, 3 below, at, above the midpoint of c and next(c).

    y may be off by a few ulps; q1 is then within 1/2 ulp plus ~2^-45 relative of a/b, so c is q1 or the
    float below it. Residuals a - c*b with |c - a/b| <= 1 ulp are exact in float32 (multiples of 2^-47 under
    2^-23), so their sum has the sign of a/b - midpoint. All values here are normal (|residual| >= 2^-48 or 0).
    """
    y = 1.0 / b
    q0 = a * y
    q1 = tl.fma(tl.fma(-q0, b, a), y, q0)
    r1 = tl.fma(-q1, b, a)
    below = r1 < 0.0
    c = tl.where(below, (q1.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), q1)
    rc = tl.where(below, tl.fma(-c, b, a), r1)
    rn = tl.fma(-(c.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), b, a)
    mid = rc + rn
    d = tl.where(rc == 0.0, 0, tl.where(mid < 0.0, 1, tl.where(mid == 0.0, 2, 3)))
    return c, d


@triton.jit
def _compose(c, d, e):
    """float32 bits of the exact value described by (c, d) from _div_bracket, times 2^e: one round to nearest
    even, float32 subnormals and zero included, Inf above the range."""
    cb = c.to(tl.int32, bitcast=True)
    t = ((cb & 0x7FFFFF) | 0x800000) * 4 + d  # a/b in quarter ulps of c: same order against every grid point
    biased = (cb >> 23) + e
    sh = tl.minimum(2 + tl.maximum(1 - biased, 0), 28)
    # The mantissa's hidden bit lands on the exponent field: a carry from rounding moves to the next binade.
    bits = ((tl.maximum(biased, 1) - 1) << 23) + _rne_shift(t, sh)
    return tl.where(biased > 254, 0x7F800000, tl.minimum(bits, 0x7F800000))


@triton.jit
def exact_quotient(a_mag, b_mag):
    """float32 bits of a / b correctly rounded (a, b positive finite non-zero float32 bits)."""
    ma, ea = _decompose(a_mag)
    mb, eb = _decompose(b_mag)
    c, d = _div_bracket(ma, mb)
    return _compose(c, d, ea - eb)


@triton.jit
def epilog_kernel(
    x_ptr, slot_ptr, cache_ptr, scale_ptr,
    n_pairs, n_slots, D, G,
    block_size, code_block_stride, scale_block_stride,  # packed-block pair only (PACKED)
    MANT: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr,
    FMAX_BITS: tl.constexpr, EMAX: tl.constexpr, NAN: tl.constexpr, FLOOR_BITS: tl.constexpr,
    MODE: tl.constexpr,  # 0 standard, 1 MX ceil (round_scale), 2 MX floor (OCP)
    X_FMT: tl.constexpr,  # x loaded as bits: 0 float32 (int32), 1 bfloat16, 2 float16 (int16)
    MX_F32_SCALE: tl.constexpr,  # MX only: store 2^e as float32 bits (int32 slots) instead of the e8m0 byte
    BLOCK_P: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr,
):
    """cache_ptr is uint8; scale_ptr is int32 (float32 bits) in standard mode and with MX_F32_SCALE, else uint8."""
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = pairs < n_pairs
    row = pairs // G
    grp = pairs - row * G
    slot = tl.load(slot_ptr + row, mask=in_range, other=-1).to(tl.int64)
    ok = in_range & (slot >= 0) & (slot < n_slots)
    col = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    if PACKED:
        # Slot s is row s % block_size of block s // block_size; blocks are a stride apart in both views.
        blk = tl.where(ok, slot, 0) // block_size
        off = tl.where(ok, slot, 0) - blk * block_size
        code_row = blk * code_block_stride + off * D
        scale_row = blk * scale_block_stride + off * G
    else:
        code_row = slot * D
        scale_row = slot * G
    mask = ok[:, None] & (col < D)
    xb = widen_bits(tl.load(x_ptr + row[:, None] * D + col, mask=mask, other=0), X_FMT)
    mag = xb & 0x7FFFFFFF
    finite = mag < 0x7F800000
    # Non-negative floats order like their bits; Inf/NaN are left out of the amax.
    amax_bits = tl.max(tl.where(finite, mag, 0), axis=1)
    # Operands of every division: x's magnitude (1 where it takes no part, to keep the unit's inputs normal).
    xm, xe = _decompose(tl.where(finite & (mag != 0), mag, 0x3F800000))
    fmax = tl.full([BLOCK_P], FMAX_BITS, tl.int32)
    if MODE == 0:
        s = tl.where(amax_bits == 0, 0, exact_quotient(tl.maximum(amax_bits, 1), fmax))
        sm, se = _decompose(tl.maximum(s, 1))
        c, d = _div_bracket(xm, sm[:, None])
        q = _compose(c, d, xe - se[:, None])
        q = tl.where(finite & (mag != 0), q, mag)
        tl.store(scale_ptr + scale_row + grp, s, mask=ok)
    else:
        floored = tl.maximum(amax_bits, FLOOR_BITS)
        if MODE == 1:
            r = exact_quotient(floored, fmax)
            e = (r >> 23) - 127 + ((r & 0x7FFFFF) != 0).to(tl.int32)
        else:
            e = (floored >> 23) - 127 - EMAX
        # x / 2^e is x's own mantissa at exponent xe - e: _compose rounds it (d = 0) only if it is subnormal.
        q = _compose(xm, tl.zeros_like(xe), xe - e[:, None])
        q = tl.where(finite & (mag != 0), q, mag)
        if MX_F32_SCALE:
            tl.store(scale_ptr + scale_row + grp, (e + 127) << 23, mask=ok)
        else:
            tl.store(scale_ptr + scale_row + grp, (e + 127).to(tl.uint8), mask=ok)
    code = encode_fp8(q | (xb & -2147483648), MANT, BIAS, MAX_CODE, FMAX_BITS, NAN)
    if MODE == 0:
        # S = 0 (amax / FMAX is 0 or rounds to 0): every finite code is 0x00, unsigned; Inf and NaN as usual.
        code = tl.where((s[:, None] == 0) & finite, 0, code)
    tl.store(cache_ptr + code_row[:, None] + col, code.to(tl.uint8), mask=mask)
