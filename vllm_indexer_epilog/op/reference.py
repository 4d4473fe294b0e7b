"""Pure-torch implementation of SPEC.md: the oracle of the tests and the fallback on any device.

It works on a bounded chunk of rows at a time, so its float32 working set does not grow with T.
The fp8 encoder uses integer bit operations rather than torch's fp8 cast: torch's cast does not
saturate and keeps NaN signs, and a device's own cast may round differently; bit operations give the
same bytes everywhere.

On CPU, float32 arithmetic obeys the calling thread's denormal mode: under `torch.set_flush_denormal(True)`
(x86 FTZ/DAZ) a subnormal scale becomes 0 and a subnormal input reads as 0. The amax is therefore taken
on the bits, and standard-mode scales and quotients are computed in float64 from exactly converted
operands (float64 never meets a subnormal here) and rounded to float32 once, by integer arithmetic where
the float32 result is subnormal. MX mode needs none of this: its scales are normal powers of two and a
subnormal quotient encodes to a zero code either way.

Several rows naming one slot: only the last of them is written (codes and scales together), so the result
does not depend on the order in which torch's indexed writes run on different threads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import envs
from .geometry import block_rows
from .hifloat8 import encode_hifloat8
from .spec import GROUP_SIZE, MX_AMAX_FLOOR, NAN_CODE, QUANT_MODE_HIFLOAT8, QUANT_MODE_STANDARD, Fp8Format
from .validation import check_slot_range, validate_epilog_args

CHUNK_ELEMENTS = 1 << 20
"""Elements of x converted to float32 at once."""


def encode_fp8(q: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Saturating round-to-nearest-even of float32 `q` into `fmt`; returns the uint8 codes."""
    m = fmt.mantissa_bits
    bits = q.contiguous().view(torch.int32)
    mag = bits & 0x7FFFFFFF
    sign = (bits >> 24) & 0x80
    # Normal range: round the 23-bit mantissa to m bits (ties to even), then rebias the exponent.
    drop = 23 - m
    normal = ((mag + ((1 << (drop - 1)) - 1) + ((mag >> drop) & 1)) >> drop) - ((127 - fmt.exponent_bias) << m)
    # Subnormal range: count steps of 2^(1-bias-m) in the value, ties to even (shift clamped to where
    # it is defined; outside [1, 25] the result is zero or not selected).
    shift = (151 - fmt.exponent_bias - m - (mag >> 23)).clamp(1, 25)
    mant = (mag & 0x7FFFFF) | 0x800000
    half = (1 << (shift - 1)) - 1
    sub = (mant + half + ((mant >> shift) & 1)) >> shift
    code = torch.where(mag < (fmt.min_normal_f32_exponent << 23), sub, normal)
    fmax_bits = torch.tensor(fmt.fmax, dtype=torch.float32).view(torch.int32).item()
    code = torch.where(mag > fmax_bits, fmt.max_code, code) | sign
    code = torch.where(mag > 0x7F800000, NAN_CODE, code)
    return code.to(torch.uint8)


_FLOOR_BITS = int(torch.tensor(MX_AMAX_FLOOR, dtype=torch.float32).view(torch.int32).item())
_MIN_NORMAL_F32 = 2.0**-126


def group_amax(xg: torch.Tensor) -> torch.Tensor:
    """Max |x| over each group's finite float32 elements ([..., G, 128] -> [..., G]); 0 when none.

    Compared as integers: non-negative floats order like their bits, and a float compare would read
    subnormals as 0 under DAZ.
    """
    mag = xg.view(torch.int32) & 0x7FFFFFFF
    return torch.where(mag < 0x7F800000, mag, 0).amax(dim=-1).view(torch.float32)


def f32_to_f64(v: torch.Tensor) -> torch.Tensor:
    """float32 -> float64 exactly, subnormals included whatever the denormal mode (a plain cast flushes them)."""
    bits = v.view(torch.int32)
    mag = bits & 0x7FFFFFFF
    tiny = mag.to(torch.float64) * 2.0**-149  # a subnormal's bits count units of 2^-149
    tiny = torch.where(bits < 0, -tiny, tiny)
    return torch.where(mag < 0x00800000, tiny, v.to(torch.float64))


def f64_to_f32_bits(v: torch.Tensor) -> torch.Tensor:
    """Round float64 `v` >= 0 (finite) to float32, nearest-even, as int32 bits; exact in any denormal mode."""
    # Below 2^-126 the result is k * 2^-149 with k = v * 2^149 rounded (ties to even); k = 2^23 is the
    # smallest normal's bit pattern, which is also right.
    sub = torch.round(v * 2.0**149).to(torch.int32)
    return torch.where(v < _MIN_NORMAL_F32, sub, v.to(torch.float32).view(torch.int32))


def standard_scale(amax: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Standard-mode scale S = fl32(amax / FMAX) as int32 bits (float64 quotient, rounded once).

    float64 carries more than twice float32's precision, so rounding its quotient again gives the
    correctly rounded float32 quotient (no double-rounding error for division).
    """
    return f64_to_f32_bits(f32_to_f64(amax) / fmt.fmax)


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(x)) (int32) of positive normal float32 values, from the bits (no float log2 rounding):
    the binade's exponent, plus one unless x is an exact power of two."""
    bits = x.contiguous().view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for integer e in [-126, 127], built from its bits."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def mx_exponent(amax: torch.Tensor, fmt: Fp8Format, round_scale: bool) -> torch.Tensor:
    """Integer e of the MX scale S = 2^e (int32), read from float32 bits so it is exact."""
    floored = torch.clamp(amax.view(torch.int32), min=_FLOOR_BITS).view(torch.float32)
    if round_scale:
        return ceil_log2(floored / fmt.fmax)  # the ratio is normal: >= 1e-4 / 57344
    return ((floored.view(torch.int32) >> 23) & 0xFF) - 127 - fmt.emax


def quantize_rows(
    x: torch.Tensor, fmt: Fp8Format, quant_mode: int, round_scale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows `x` [R, d] (any float dtype): uint8 codes [R, d] and scales [R, G].

    Scales are float32 in standard mode and e8m0 bytes (uint8) in MX mode.
    """
    rows, d = x.shape
    pad = -d % GROUP_SIZE
    # Zero padding leaves the finite amax unchanged; padded codes are cut off below.
    xg = F.pad(x.float(), (0, pad)).view(rows, -1, GROUP_SIZE)
    amax = group_amax(xg)
    if quant_mode == QUANT_MODE_STANDARD:
        if x.device.type == "cpu":
            # The thread's FTZ/DAZ mode must not matter (module docstring). Other devices keep float32:
            # CUDA does not flush by default and an NPU need not have float64.
            s_bits = standard_scale(amax, fmt)
            mag = xg.view(torch.int32) & 0x7FFFFFFF
            subnormal_in = bool(((mag > 0) & (mag < 0x00800000)).any()) or bool(((s_bits > 0) & (s_bits < 0x00800000)).any())
            if subnormal_in:
                q = (f32_to_f64(xg) / f32_to_f64(s_bits.view(torch.float32)).unsqueeze(-1)).to(torch.float32)
            else:
                # Normal operands: the float32 quotient is exact in any mode (a flushed subnormal quotient
                # and the exact one both encode to a signed zero code).
                q = xg / s_bits.view(torch.float32).unsqueeze(-1)
        else:
            s_bits = (amax / fmt.fmax).view(torch.int32)
            q = xg / s_bits.view(torch.float32).unsqueeze(-1)
        codes = encode_fp8(q, fmt)
        # S = 0: there is nothing to scale, and x/0 would be NaN or Inf, so finite elements become 0x00.
        finite = (xg.view(torch.int32) & 0x7FFFFFFF) < 0x7F800000
        codes = torch.where((s_bits == 0).unsqueeze(-1) & finite, 0, codes).to(torch.uint8)
        scales = s_bits.view(torch.float32)
    else:
        e = mx_exponent(amax, fmt, round_scale)
        codes = encode_fp8(xg * pow2(-e).unsqueeze(-1), fmt)  # exact: the same as dividing by 2^e
        scales = (e + 127).to(torch.uint8)
    return codes.view(rows, -1)[:, :d], scales


def scaled_f32(x: torch.Tensor, scale: float) -> torch.Tensor:
    """fl32(fl32(x) * fl32(scale)) elementwise (float32), the one correctly rounded product of HiFloat8 mode.

    scale 1.0: x itself (the product is exact). On CPU the product is taken in float64 from exactly converted
    operands (two float32 significands multiply exactly in float64) and rounded to float32 once by
    f64_to_f32_bits, so a subnormal x or scale counts at its exact value under any FTZ/DAZ mode. Other devices
    multiply in float32 (CUDA does not flush by default; an NPU need not have float64).
    """
    xf = x.float()
    if scale == 1.0:
        return xf
    if x.device.type != "cpu":
        return xf * torch.tensor(scale, dtype=torch.float32, device=x.device)
    s64 = f32_to_f64(torch.tensor([scale], dtype=torch.float32))
    p = f32_to_f64(xf) * s64
    finite = torch.isfinite(p)
    mag = torch.where(finite, p.abs(), 0.0)
    bits = f64_to_f32_bits(mag) | torch.where(p < 0, -(2**31), 0).to(torch.int32)
    # Inf * finite and NaN are exact in float64 and their float32 cast keeps them.
    bits = torch.where(finite, bits, p.to(torch.float32).view(torch.int32))
    return bits.view(torch.float32)


def last_writers(slots: torch.Tensor) -> torch.Tensor:
    """Rows that write: those with a slot >= 0, and of several naming one slot only the last.

    Returned in slot order. An indexed write with repeated indices lets threads race (codes of one row
    beside scales of another); with each slot once, every write is whole and the result deterministic.
    """
    rows = torch.nonzero(slots >= 0).reshape(-1)
    if rows.numel() < 2:
        return rows
    wanted = slots[rows]
    order = torch.sort(wanted, stable=True).indices  # equal slots stay in row order: the last is the latest
    by_slot = wanted[order]
    last = torch.ones_like(by_slot, dtype=torch.bool)
    last[:-1] = by_slot[1:] != by_slot[:-1]
    return rows[order[last]]


def reference_indexer_compress_epilog(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    quant_mode: int = 1,
    round_scale: bool = True,
    scale: float = 1.0,
    packed: bool | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> None:
    """The op, in plain torch: validates, checks slots strictly, then writes chunk by chunk.

    Slots outside [-1, N) raise before anything is written; several rows naming one slot leave the last
    one's codes and scales (strict mode, VLLM_INDEXER_EPILOG_STRICT=1, rejects them instead).
    The cache and scale may be two contiguous tensors or the two views of a packed-block buffer (geometry.py),
    told apart as `validate_epilog_args` does (`packed=None`); `packed=True`/`False` insists on one of them.
    HiFloat8 mode (quant_mode=2) writes HiF8(fl32(x * scale)) codes and leaves indexer_compress_scale untouched.
    """
    p = validate_epilog_args(
        indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode, round_scale, packed=packed,
        scale_value=scale,
    )
    check_slot_range(slot_mapping, p.slots, reject_duplicates=envs.strict())
    # Both layouts are written through [blocks, rows per block, width] views; contiguous is one block.
    geometry = p.geometry
    cache3 = block_rows(indexer_compress_cache.view(torch.uint8), geometry, p.dim)
    slots = slot_mapping.reshape(-1).long()
    rows = last_writers(slots)
    x2 = x.reshape(p.rows, p.dim)
    if p.hifloat8:
        step = max(1, chunk_elements // p.dim)
        for start in range(0, rows.numel(), step):
            r = rows[start : start + step]
            codes = encode_hifloat8(scaled_f32(x2.index_select(0, r), p.scale))
            block, offset = slots[r].div(geometry.block_size, rounding_mode="floor"), slots[r] % geometry.block_size
            cache3[block, offset] = codes
        return
    scale_as = torch.int32 if p.quant_mode == QUANT_MODE_STANDARD else torch.uint8
    scale3 = block_rows(indexer_compress_scale.view(scale_as), geometry, p.groups)
    step = max(1, chunk_elements // (p.groups * GROUP_SIZE))
    for start in range(0, rows.numel(), step):
        r = rows[start : start + step]
        codes, scales = quantize_rows(x2.index_select(0, r), p.fmt, p.quant_mode, p.round_scale)
        block, offset = slots[r].div(geometry.block_size, rounding_mode="floor"), slots[r] % geometry.block_size
        cache3[block, offset] = codes
        # Written as bits in standard mode too: the int32 view keeps a subnormal scale whatever the FTZ mode.
        scale3[block, offset] = scales.view(scale_as)
