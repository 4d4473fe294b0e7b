"""Triton backend of the op (CUDA today; the same source runs under TRITON_INTERPRET=1 on CPU).

One program quantizes BLOCK_P (row, group) pairs as a [BLOCK_P, 128] tile: several short rows per
program when d = 128, a slice of one long row when d = 4096, and a masked tail group for any d.
Rows whose slot is -1 or out of [0, N) load nothing and store nothing. The fp8 encode is integer bit
arithmetic (the interpreter's fp8 cast is wrong, and the bits must match the other backends);
standard-mode divisions use `div_rn` because Triton's default fp32 `/` is not correctly rounded.
This module imports Triton at load time; registration.py imports it only when a CUDA call comes.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import envs
from ..op.spec import GROUP_SIZE, MX_AMAX_FLOOR, NAN_CODE, QUANT_MODE_STANDARD
from ..op.validation import check_slot_range, validate_epilog_args


@triton.jit
def encode_fp8(
    q, MANT: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr, FMAX_BITS: tl.constexpr, NAN: tl.constexpr
):
    bits = q.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    sign = (bits >> 24) & 0x80
    DROP: tl.constexpr = 23 - MANT
    normal = ((mag + ((1 << (DROP - 1)) - 1) + ((mag >> DROP) & 1)) >> DROP) - ((127 - BIAS) << MANT)
    shift = tl.minimum(tl.maximum(151 - BIAS - MANT - (mag >> 23), 1), 25)
    mant = (mag & 0x7FFFFF) | 0x800000
    sub = (mant + ((1 << (shift - 1)) - 1) + ((mant >> shift) & 1)) >> shift
    code = tl.where(mag < ((128 - BIAS) << 23), sub, normal)
    code = tl.where(mag > FMAX_BITS, MAX_CODE, code) | sign
    return tl.where(mag > 0x7F800000, NAN, code)

@triton.jit
def epilog_kernel(
    x_ptr, slot_ptr, cache_ptr, scale_ptr,
    n_pairs, n_slots, D, G,
    block_size, code_block_stride, scale_block_stride,  # packed-block pair only (PACKED)
    FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr,
    FMAX_BITS: tl.constexpr, EMAX: tl.constexpr, NAN: tl.constexpr, FLOOR_BITS: tl.constexpr,
    MODE: tl.constexpr,  # 0 standard, 1 MX ceil (round_scale), 2 MX floor (OCP)
    BLOCK_P: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr,
):
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
    xv = tl.load(x_ptr + row[:, None] * D + col, mask=mask, other=0.0).to(tl.float32)
    mag = xv.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    finite = mag < 0x7F800000
    # Non-negative floats order like their bits; Inf/NaN are left out of the amax.
    amax_bits = tl.max(tl.where(finite, mag, 0), axis=1)
    amax = amax_bits.to(tl.float32, bitcast=True)
    fmax = tl.full([BLOCK_P], FMAX, tl.float32)
    if MODE == 0:
        s = tl.math.div_rn(amax, fmax)
        q = tl.math.div_rn(xv, s[:, None])
        code = encode_fp8(q, MANT, BIAS, MAX_CODE, FMAX_BITS, NAN)
        code = tl.where((s[:, None] == 0.0) & finite, 0, code)
        tl.store(scale_ptr + scale_row + grp, s, mask=ok)
    else:
        floored = tl.maximum(amax_bits, FLOOR_BITS)
        if MODE == 1:
            r = tl.math.div_rn(floored.to(tl.float32, bitcast=True), fmax).to(tl.int32, bitcast=True)
            e = (r >> 23) - 127 + ((r & 0x7FFFFF) != 0).to(tl.int32)
        else:
            e = (floored >> 23) - 127 - EMAX
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e: the product is exact like x / 2^e
        code = encode_fp8(xv * inv[:, None], MANT, BIAS, MAX_CODE, FMAX_BITS, NAN)
        tl.store(scale_ptr + scale_row + grp, (e + 127).to(tl.uint8), mask=ok)
    tl.store(cache_ptr + code_row[:, None] + col, code.to(tl.uint8), mask=mask)


def _f32_bits(v: float) -> int:
    return int(torch.tensor(v, dtype=torch.float32).view(torch.int32).item())


def launch_config(pairs: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps): small tiles for decode-sized calls, 32 groups (16 KiB of bf16) otherwise."""
    if pairs <= 64:
        return 8, 2
    return 32, 4


def triton_indexer_compress_epilog(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    quant_mode: int = QUANT_MODE_STANDARD,
    round_scale: bool = True,
    scale: float = 1.0,
) -> None:
    """Launch the kernel on x's device (CUDA, or CPU under TRITON_INTERPRET=1); HiFloat8 (quant_mode=2, with
    its `scale`) runs backends/triton_hif8.py's kernel.

    Two rows naming one slot: one of them wins, which is unspecified (checking would cost a host sync);
    strict mode rejects them. The cache and scale may be a packed-block pair (op/geometry.py): rows are then
    addressed as block * block stride + offset in block, in both views (PACKED specializes the kernel, so
    contiguous caches run the code they always did).
    """
    if quant_mode == 2 or scale != 1.0:  # HiFloat8; its validation refuses scale != 1.0 in modes 0 and 1
        from .triton_hif8 import triton_hif8_epilog

        return triton_hif8_epilog(indexer_compress_cache, indexer_compress_scale, x, slot_mapping,
                                  quant_mode=quant_mode, round_scale=round_scale, scale=scale)
    p = validate_epilog_args(indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode, round_scale)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if envs.strict() and not capturing:  # a capture cannot sync; replays keep the on-device skip
        check_slot_range(slot_mapping, p.slots, reject_duplicates=True)
    pairs = p.rows * p.groups
    if pairs == 0:
        return
    fmt = p.fmt
    mode = 0 if quant_mode == QUANT_MODE_STANDARD else (1 if round_scale else 2)
    scale_arg = indexer_compress_scale if mode == 0 else indexer_compress_scale.view(torch.uint8)
    geo = p.geometry
    # A packed pair's scale view: its block stride in its own elements (the uint8 view of e8m0 keeps it).
    scale_block_stride = indexer_compress_scale.stride(0) if p.packed and geo.num_blocks > 1 else 0
    block_p, num_warps = launch_config(pairs)
    grid = ((pairs + block_p - 1) // block_p,)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        epilog_kernel[grid](
            x, slot_mapping, indexer_compress_cache.view(torch.uint8), scale_arg,
            pairs, p.slots, p.dim, p.groups,
            max(geo.block_size, 1), geo.block_bytes if p.packed else 0, scale_block_stride,
            FMAX=fmt.fmax, MANT=fmt.mantissa_bits, BIAS=fmt.exponent_bias, MAX_CODE=fmt.max_code,
            FMAX_BITS=_f32_bits(fmt.fmax), EMAX=fmt.emax, NAN=NAN_CODE, FLOOR_BITS=_f32_bits(MX_AMAX_FLOOR), MODE=mode,
            BLOCK_P=block_p, GROUP=GROUP_SIZE, PACKED=p.packed, num_warps=num_warps,
        )
