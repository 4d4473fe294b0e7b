"""HiFloat8 (HiF8) codec of quant_mode=2, as integer operations on float32 bit patterns.

The rules are written down in docs/hifloat8.md; this module is the reference the C++
(csrc/hif8_codec.h) and Triton (backends/hif8_triton.py) encoders are tested against, and all
three are tested against the `en_dtypes.hifloat8` numpy cast (tests/op/test_hifloat8.py).

Why integer ops: the encode must be bit-exact on every device. Float arithmetic would depend on the
device's rounding mode, flush-to-zero of float32 subnormals and on how a backend lowers a float ->
fp8 cast (Triton's CPU interpreter gets those wrong). Integer adds, shifts and masks on the float32
bits give the same bytes everywhere.

Summary of the encoding (one byte, sign-magnitude; 0x00 is zero, 0x80 NaN, 0x6F/0xEF are +/-Inf):

    |e| of the value 2^e * 1.m   dot prefix   exponent bits   mantissa bits
    0                            0001         0               3
    1                            001          1               3
    2..3                         01           2               3
    4..7                         10           3               2
    8..15                        11           4               1
    denormal 2^-22 .. 2^-16      0000         -               3 (holds e + 23)

The exponent field is sign-magnitude: its first bit is the sign of e (1 = negative), the remaining
D-1 bits are |e| without its leading 1 (which is implicit). Rounding is to nearest with ties away
from zero; magnitudes >= 40960 (half-way between the largest finite 2^15 and the unrepresentable
1.5 * 2^15) become +/-Inf unless `saturate` asks for +/-2^15.
"""

from __future__ import annotations

import math

import torch

HIF8_NAN_CODE = 0x80
HIF8_POS_INF_CODE = 0x6F
HIF8_MAX_CODE = 0x6E  # +32768 = 2^15, the largest finite magnitude
HIF8_MAX = 32768.0
# float32 bit patterns of the decision boundaries (magnitudes), see docs/hifloat8.md.
_F32_INF_BITS = 0x7F800000
_F32_OVERFLOW_BITS = 0x47200000  # 40960.0 = 1.25 * 2^15: at or above, the cast overflows
_F32_MIN_NORMAL_BITS = 0x38000000  # 2^-15, the smallest HiF8 normal
_F32_HALF_MIN_DENORMAL_BITS = 0x34000000  # 2^-23: below this, the value rounds to zero


def _normal_code7(mag: torch.Tensor) -> torch.Tensor:
    """Low 7 bits of the code of a magnitude in [2^-15, 40960) (float32 bits, int32 tensor).

    The binade [2^e, 2^(e+1)) keeps k(e) mantissa bits; adding half an ulp of that precision to
    the float32 bits and truncating rounds to nearest with ties away from zero (the tie carries
    up, which for a magnitude is away from zero). A carry out of the mantissa moves the value to
    2^(e+1) with an all-zero mantissa, which is representable whatever k(e+1) is, so k is chosen
    from the exponent before rounding and the fields from the exponent after it.
    """
    e = (mag >> 23) - 127
    k = _mantissa_bits(e.abs())
    drop = 23 - k
    r = (mag + (1 << (drop - 1))) >> drop << drop
    e_r = (r >> 23) - 127
    ae = e_r.abs()
    k_r = _mantissa_bits(ae)
    m = (r >> (23 - k_r)) & ((1 << k_r) - 1)
    # D = width of the exponent field: 0, 1, 2, 3 or 4 for |e| = 0, 1, 2..3, 4..7, 8..15.
    d = torch.where(ae == 0, 0, torch.where(ae == 1, 1, torch.where(ae < 4, 2, torch.where(ae < 8, 3, 4))))
    # Dot prefixes 0001, 001, 01, 10, 11 at the top of the 7 magnitude bits.
    prefix = torch.where(
        d == 0, 0x08, torch.where(d == 1, 0x10, torch.where(d == 2, 0x20, torch.where(d == 3, 0x40, 0x60)))
    )
    hidden = torch.where(d == 0, 0, 1 << (d - 1).clamp(min=0))
    exp_field = torch.where(d == 0, 0, ((e_r < 0).to(torch.int32) << (d - 1).clamp(min=0)) | (ae - hidden))
    return prefix | (exp_field << k_r) | m


def _mantissa_bits(abs_exp: torch.Tensor) -> torch.Tensor:
    """Tapered precision: 3 mantissa bits for |e| <= 3, 2 for 4..7, 1 for 8..15."""
    return torch.where(abs_exp <= 3, 3, torch.where(abs_exp <= 7, 2, 1)).to(torch.int32)


def _denormal_code7(mag: torch.Tensor) -> torch.Tensor:
    """Low 7 bits of the code of a magnitude in [2^-23, 2^-15) (float32 bits, int32 tensor).

    HiF8 denormals are the powers of two 2^-22 .. 2^-16 only, so a value 1.f * 2^e lies between
    2^e and 2^(e+1) and rounds up exactly when f >= 0.5 (mantissa bit 22; the tie 1.5 * 2^e goes
    away from zero). Below 2^-22 the neighbours are 0 and 2^-22 with the midpoint 2^-23, which the
    caller has already excluded, so everything left there rounds up to 2^-22. Rounding up out of
    2^-16 reaches 2^-15, the smallest normal, whose code is 0x7E.
    """
    e = (mag >> 23) - 127
    e_r = torch.clamp(e + ((mag >> 22) & 1), min=-22)
    return torch.where(e_r >= -15, 0x7E, e_r + 23)


def encode_hifloat8(values_f32: torch.Tensor, saturate: bool = False) -> torch.Tensor:
    """HiF8 codes (uint8, same shape) of float32 values, round-half-away, on any device.

    `saturate=False` is the `en_dtypes.hifloat8` cast bit for bit (the op's contract): finite
    magnitudes >= 40960 and +/-Inf give +/-Inf (0x6F / 0xEF). `saturate=True` is the same cast of
    the value clipped to [-2^15, 2^15] (finite overflow and +/-Inf give 0x6E / 0xEE); it models the
    Ascend kernel's SAT cast and is kept for comparison, not used by the op. NaN gives 0x80 in
    both, and every value that rounds to zero (either sign) gives 0x00, because 0x80 is NaN.
    """
    if values_f32.dtype != torch.float32:
        raise TypeError(f"encode_hifloat8 takes float32 values, got {values_f32.dtype}")
    bits = values_f32.contiguous().view(torch.int32)
    mag = bits & 0x7FFFFFFF
    sign = torch.where(bits < 0, 0x80, 0).to(torch.int32)
    # Clamping keeps the other branch's shifts in range; torch.where discards its lanes anyway.
    normal = _normal_code7(mag.clamp(_F32_MIN_NORMAL_BITS, _F32_OVERFLOW_BITS - 1))
    denormal = _denormal_code7(mag.clamp(_F32_HALF_MIN_DENORMAL_BITS, _F32_MIN_NORMAL_BITS - 1))
    code7 = torch.where(mag < _F32_MIN_NORMAL_BITS, denormal, normal)
    code7 = torch.where(mag < _F32_HALF_MIN_DENORMAL_BITS, 0, code7)
    overflow_code = HIF8_MAX_CODE if saturate else HIF8_POS_INF_CODE
    code7 = torch.where(mag >= _F32_OVERFLOW_BITS, overflow_code, code7)
    code = torch.where(code7 == 0, 0, code7 | sign)
    code = torch.where(mag > _F32_INF_BITS, HIF8_NAN_CODE, code)
    return code.to(torch.uint8)


def _decode_code(code: int) -> float:
    """Value of one HiF8 code, from the field layout (exact: every value is a small dyadic)."""
    if code == HIF8_NAN_CODE:
        return math.nan
    sign = -1.0 if code & 0x80 else 1.0
    c = code & 0x7F
    if c == HIF8_POS_INF_CODE:
        return sign * math.inf
    if c < 0x08:  # dot 0000: zero or a denormal 2^(M-23)
        return 0.0 if c == 0 else sign * 2.0 ** (c - 23)
    if c < 0x10:  # dot 0001, D = 0
        d, k = 0, 3
    elif c < 0x20:  # dot 001
        d, k = 1, 3
    elif c < 0x40:  # dot 01
        d, k = 2, 3
    elif c < 0x60:  # dot 10
        d, k = 3, 2
    else:  # dot 11
        d, k = 4, 1
    m = c & ((1 << k) - 1)
    exp_field = (c >> k) & ((1 << d) - 1)
    if d == 0:
        e = 0
    else:
        mag = (1 << (d - 1)) | (exp_field & ((1 << (d - 1)) - 1))
        e = -mag if exp_field >> (d - 1) else mag
    return sign * (1.0 + m / (1 << k)) * 2.0**e


# Built once from the layout; 256 float32 entries, every one exactly representable.
HIF8_DECODE_TABLE: torch.Tensor = torch.tensor([_decode_code(c) for c in range(256)], dtype=torch.float32)


def decode_hifloat8(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of HiF8 codes (uint8 tensor), by table lookup on the codes' device."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"decode_hifloat8 takes uint8 codes, got {codes.dtype}")
    return HIF8_DECODE_TABLE.to(codes.device)[codes.long()]
