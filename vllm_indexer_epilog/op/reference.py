"""Pure-torch implementation of SPEC.md: the oracle of the tests and the fallback on any device.

It works on a bounded chunk of rows at a time, so its float32 working set does not grow with T.
The fp8 encoder uses integer bit operations rather than torch's fp8 cast: torch's cast does not
saturate and keeps NaN signs, and a device's own cast may round differently; bit operations give the
same bytes everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import block_rows
from .spec import GROUP_SIZE, MX_AMAX_FLOOR, NAN_CODE, QUANT_MODE_STANDARD, Fp8Format
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


def group_amax(xg: torch.Tensor) -> torch.Tensor:
    """Max |x| over each group's finite elements ([..., G, 128] -> [..., G]); 0 when none."""
    return torch.where(torch.isfinite(xg), xg.abs(), 0.0).amax(dim=-1)


def mx_exponent(amax: torch.Tensor, fmt: Fp8Format, round_scale: bool) -> torch.Tensor:
    """Integer e of the MX scale S = 2^e (int32), read from float32 bits so it is exact."""
    floored = amax.clamp(min=MX_AMAX_FLOOR)
    if round_scale:
        ratio = (floored / fmt.fmax).view(torch.int32)  # normal: >= 1e-4 / 57344
        # ceil(log2): the binade's exponent, plus one unless the ratio is an exact power of two.
        return ((ratio >> 23) & 0xFF) - 127 + ((ratio & 0x7FFFFF) != 0).to(torch.int32)
    return ((floored.view(torch.int32) >> 23) & 0xFF) - 127 - fmt.emax


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for integer e in [-126, 127], built from its bits."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


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
        s = amax / fmt.fmax
        codes = encode_fp8(xg / s.unsqueeze(-1), fmt)
        # S = 0: there is nothing to scale, and x/0 would be NaN or Inf, so finite elements become 0x00.
        codes = torch.where((s == 0).unsqueeze(-1) & torch.isfinite(xg), 0, codes).to(torch.uint8)
        scales = s
    else:
        e = mx_exponent(amax, fmt, round_scale)
        codes = encode_fp8(xg * pow2(-e).unsqueeze(-1), fmt)  # exact: the same as dividing by 2^e
        scales = (e + 127).to(torch.uint8)
    return codes.view(rows, -1)[:, :d], scales


def reference_indexer_compress_epilog(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    quant_mode: int = 1,
    round_scale: bool = True,
    packed: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> None:
    """The op, in plain torch: validates, checks slots strictly, then writes chunk by chunk.

    `packed=True` writes the two views of a packed-block buffer (layouts.py) instead of two contiguous tensors.
    """
    p = validate_epilog_args(
        indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode, round_scale, packed=packed
    )
    check_slot_range(slot_mapping, p.slots)
    # Both layouts are written through [blocks, rows per block, width] views; contiguous is one block.
    geometry = p.geometry
    cache3 = block_rows(indexer_compress_cache.view(torch.uint8), geometry, p.dim)
    scale3 = indexer_compress_scale if p.quant_mode == QUANT_MODE_STANDARD else indexer_compress_scale.view(torch.uint8)
    scale3 = block_rows(scale3, geometry, p.groups)
    slots = slot_mapping.reshape(-1).long()
    rows = torch.nonzero(slots >= 0).reshape(-1)
    x2 = x.reshape(p.rows, p.dim)
    step = max(1, chunk_elements // (p.groups * GROUP_SIZE))
    for start in range(0, rows.numel(), step):
        r = rows[start : start + step]
        codes, scales = quantize_rows(x2.index_select(0, r), p.fmt, p.quant_mode, p.round_scale)
        block, offset = slots[r].div(geometry.block_size, rounding_mode="floor"), slots[r] % geometry.block_size
        cache3[block, offset] = codes
        scale3[block, offset] = scales
