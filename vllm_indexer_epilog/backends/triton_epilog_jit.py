"""The epilog's Triton kernel source, one for CUDA and Ascend (triton-ascend); imports nothing but Triton.

No torch import, so scripts/ascend_lower.py can load this file by path in triton-ascend's own venv (where torch
and this package's other modules need not exist). The launchers live in triton_kernel.py (CUDA, and the CPU
interpreter) and npu.py (torch_npu).

Exactness without IEEE float arithmetic (docs/ascend-triton.md has the proof sketch and what was measured).
Ascend's vector `Div` is documented as within 1 ulp and flushing subnormals to zero, and triton-ascend 3.2.0
lowers `tl.fma` to a separate multiply and add (two roundings), so the kernel relies on no float op being
correctly rounded, fused or subnormal-aware. Its one float op is a division of two floats in [1, 2), whose
result may be off by up to MAX_DIV_ULPS ulps; everything else is 32-bit integer arithmetic:
- x is loaded as raw bits and widened to float32 bits with integer ops; amax is an integer max of magnitudes;
  a subnormal's mantissa is normalised by an integer leading-zero count.
- a quotient a / b (amax / FMAX, x / S, floored amax / FMAX) is taken between 24-bit mantissas A, B: the unit's
  float quotient gives a first guess V of floor(A * 2^24 / B), and 2 * MAX_DIV_ULPS + 1 steps move it to the
  exact value, each step comparing A * 2^24 with V * B exactly (a 48-bit product in 12-bit limbs); one more
  comparison places the quotient against V + 1/2.
- `_round_bits` rounds that exactly known quotient, times 2^e, to float32 bits: one round to nearest even,
  float32 subnormal results included (a standard-mode scale may be one). The FP8 encode is integer as before.
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


MAX_DIV_ULPS = 2
"""Error of the unit's float32 division (operands in [1, 2)) that the kernel corrects, in ulps away from the
correctly rounded quotient: Ascend's Div is documented within 1 ulp, CUDA's default `div.full.f32` within 2."""


@triton.jit
def _normalize_step(m, n, S: tl.constexpr):
    low = m < (1 << (24 - S))
    return tl.where(low, m << S, m), tl.where(low, n + S, n)


@triton.jit
def _normalize(m):
    """(m << n, n) for 0 < m < 2^24 with bit 23 of the result set: a leading-zero count in integer steps, so
    subnormals never meet a float unit."""
    m, n = _normalize_step(m, tl.zeros_like(m), 16)
    m, n = _normalize_step(m, n, 8)
    m, n = _normalize_step(m, n, 4)
    m, n = _normalize_step(m, n, 2)
    return _normalize_step(m, n, 1)


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
        special = (m10 << 13) | 0x7F800000
        # A float16 subnormal m10 * 2^-24 is a float32 normal.
        mn, n = _normalize(tl.maximum(m10, 1))  # m10 * 2^-24 = (mn * 2^-23) * 2^(-1 - n)
        sub = tl.where(m10 == 0, 0, ((126 - n) << 23) | (mn & 0x7FFFFF))
        return sign | tl.where(e5 == 0x1F, special, tl.where(e5 == 0, sub, normal))


@triton.jit
def _decompose(mag):
    """A positive finite non-zero float32 magnitude (bits) as (M, e): value = M * 2^(e - 23), 2^23 <= M < 2^24."""
    expf = mag >> 23
    mn, n = _normalize(tl.maximum(mag & 0x7FFFFF, 1))
    sub = expf == 0
    return tl.where(sub, mn, (mag & 0x7FFFFF) | 0x800000), tl.where(sub, -126 - n, expf - 127)


@triton.jit
def _cmp_mul(a2, k, b):
    """Sign (-1, 0, 1) of a2 * 2^24 - k * b, exactly, in int32: a2 < 2^26, k < 2^27, b < 2^24."""
    kh = k >> 12
    kl = k & 0xFFF
    bh = b >> 12
    bl = b & 0xFFF
    mid = kh * bl + kl * bh
    lo = ((mid & 0xFFF) << 12) + kl * bl
    hi = kh * bh + (mid >> 12) + (lo >> 24)
    dh = a2 - hi
    return tl.where(dh > 0, 1, tl.where(dh < 0, -1, -((lo & 0xFFFFFF) != 0).to(tl.int32)))


@triton.jit
def _quotient(a, b, MAX_DIV_ULPS: tl.constexpr):
    """a / b for 24-bit mantissas (2^23 <= a, b < 2^24) as 4 * V + d: V = floor(a * 2^24 / b) (2^23 < V < 2^25)
    and d = 0 if that is exact, else 1, 2, 3 for below, at, above V + 1/2: the quotient in quarter units
    of 2^-24, ordered like the exact one against every point of the 2^-25 grid."""
    # The unit's quotient of two floats in [1, 2), within MAX_DIV_ULPS ulps: a first guess only.
    q = (a | (127 << 23)).to(tl.float32, bitcast=True) / (b | (127 << 23)).to(tl.float32, bitcast=True)
    qb = q.to(tl.int32, bitcast=True)
    qe = tl.minimum(tl.maximum((qb >> 23) - 126, 0), 2)  # q in [1/2, 1): 0, [1, 2): 1, >= 2: 2
    v = ((qb & 0x7FFFFF) | 0x800000) << qe
    # The true quotient lies in (1/2, 2): a guess outside it (an error across a binade edge) starts at the edge.
    v = tl.where(qb < (126 << 23), 1 << 23, tl.minimum(v, (1 << 25) - 1))
    # q within MAX_DIV_ULPS ulps of the correctly rounded quotient is within MAX_DIV_ULPS + 1/2 ulps of a / b,
    # and one float32 ulp is at most 2 units of 2^-24: v is at most 2 * MAX_DIV_ULPS + 1 units from the floor.
    for _ in tl.static_range(2 * MAX_DIV_ULPS + 1):
        v = tl.where(_cmp_mul(a, v, b) < 0, v - 1, tl.where(_cmp_mul(a, v + 1, b) >= 0, v + 1, v))
    exact = _cmp_mul(a, v, b) == 0
    half = _cmp_mul(2 * a, 2 * v + 1, b)
    return 4 * v + tl.where(exact, 0, half + 2)


@triton.jit
def _round_bits(t4, e):
    """float32 bits of t4 * 2^(e - 26) (2^25 <= t4 < 2^27): one round to nearest even, float32 subnormals and
    zero included, Inf above the range."""
    top = (t4 >> 26) & 1  # the leading bit is bit 25 + top
    biased = 126 + top + e
    sh = tl.minimum(2 + top + tl.maximum(1 - biased, 0), 30)
    # The mantissa's hidden bit lands on the exponent field: a carry from rounding moves to the next binade.
    bits = ((tl.maximum(biased, 1) - 1) << 23) + _rne_shift(t4, sh)
    return tl.where(biased > 254, 0x7F800000, tl.minimum(bits, 0x7F800000))


@triton.jit
def exact_quotient(a_mag, b_mag, MAX_DIV_ULPS: tl.constexpr):
    """float32 bits of a / b correctly rounded (a, b positive finite non-zero float32 bits)."""
    ma, ea = _decompose(a_mag)
    mb, eb = _decompose(b_mag)
    return _round_bits(_quotient(ma, mb, MAX_DIV_ULPS), ea - eb)


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
    BLOCK_P: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr, MAX_DIV_ULPS: tl.constexpr,
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
    # x's mantissa and exponent (taken from 1.0 where x is 0, Inf or NaN: those are not divided).
    xm, xe = _decompose(tl.where(finite & (mag != 0), mag, 0x3F800000))
    fmax = tl.full([BLOCK_P], FMAX_BITS, tl.int32)
    if MODE == 0:
        s = tl.where(amax_bits == 0, 0, exact_quotient(tl.maximum(amax_bits, 1), fmax, MAX_DIV_ULPS))
        sm, se = _decompose(tl.maximum(s, 1))
        q = _round_bits(_quotient(xm, sm[:, None], MAX_DIV_ULPS), xe - se[:, None])
        q = tl.where(finite & (mag != 0), q, mag)
        tl.store(scale_ptr + scale_row + grp, s, mask=ok)
    else:
        floored = tl.maximum(amax_bits, FLOOR_BITS)
        if MODE == 1:
            r = exact_quotient(floored, fmax, MAX_DIV_ULPS)
            e = (r >> 23) - 127 + ((r & 0x7FFFFF) != 0).to(tl.int32)
        else:
            e = (floored >> 23) - 127 - EMAX
        # x / 2^e is x's own mantissa at exponent xe - e: _round_bits rounds it only if it is subnormal.
        q = _round_bits(xm << 3, xe - e[:, None])
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
