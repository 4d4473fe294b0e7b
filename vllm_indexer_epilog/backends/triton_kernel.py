"""Triton backend of the op: the launcher (CUDA; the same code runs under TRITON_INTERPRET=1 on CPU, and
npu.py's `triton` backend launches it on torch_npu tensors through triton-ascend).

The kernel source is triton_epilog_jit.py (torch-free, one source for CUDA and Ascend). One program
quantizes BLOCK_P (row, group) pairs as a [BLOCK_P, 128] tile: several short rows per program when d = 128,
a slice of one long row when d = 4096, and a masked tail group for any d. Rows whose slot is -1 or out of
[0, N) load nothing and store nothing. Everything that decides a byte is integer arithmetic or an exact
division built from a reciprocal and FMA residuals, so the bytes do not depend on a correctly rounded
division or on subnormal support (the interpreter's fp8/bf16 casts are wrong too; none is used).
This module imports Triton at load time; registration.py imports it only when a CUDA call comes.
"""

from __future__ import annotations

import contextlib
import struct

import torch

from .. import envs
from ..op.spec import GROUP_SIZE, MX_AMAX_FLOOR, NAN_CODE, QUANT_MODE_STANDARD
from ..op.validation import EpilogProblem, check_slot_range, validate_epilog_args
from .triton_epilog_jit import MAX_DIV_ULPS, epilog_kernel

_X_FMT = {torch.float32: (0, torch.int32), torch.bfloat16: (1, torch.int16), torch.float16: (2, torch.int16)}


def _f32_bits(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", v))[0]


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
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        launch(p, indexer_compress_cache, indexer_compress_scale, x, slot_mapping, round_scale=round_scale)


def launch(
    p: EpilogProblem,
    cache: torch.Tensor,
    scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    round_scale: bool,
    mx_float32_scale: bool = False,
) -> None:
    """Launch the kernel on already validated arguments (`p` from validate_epilog_args), on x's device; no
    host sync. Slots outside [0, N) are skipped by the kernel. `mx_float32_scale`: MX mode writing each
    group's 2^e, exactly, into float32 scale slots (a packed page laid out for standard mode)."""
    pairs = p.rows * p.groups
    if pairs == 0:
        return
    fmt = p.fmt
    mode = 0 if p.quant_mode == QUANT_MODE_STANDARD else (1 if round_scale else 2)
    # Scales as bits: float32 as int32 (no float store path can flush a subnormal scale), e8m0 as uint8.
    scale_arg = scale.view(torch.int32) if scale.dtype == torch.float32 else scale.view(torch.uint8)
    x_fmt, x_bits = _X_FMT[x.dtype]
    geo = p.geometry
    # A packed pair's scale view: its block stride in its own elements (the int/uint8 views keep it).
    scale_block_stride = scale.stride(0) if p.packed and geo.num_blocks > 1 else 0
    block_p, num_warps = launch_config(pairs)
    grid = ((pairs + block_p - 1) // block_p,)
    epilog_kernel[grid](
        x.view(x_bits), slot_mapping, cache.view(torch.uint8), scale_arg,
        pairs, p.slots, p.dim, p.groups,
        max(geo.block_size, 1), geo.block_bytes if p.packed else 0, scale_block_stride,
        MANT=fmt.mantissa_bits, BIAS=fmt.exponent_bias, MAX_CODE=fmt.max_code,
        FMAX_BITS=_f32_bits(fmt.fmax), EMAX=fmt.emax, NAN=NAN_CODE, FLOOR_BITS=_f32_bits(MX_AMAX_FLOOR), MODE=mode,
        X_FMT=x_fmt, MX_F32_SCALE=mx_float32_scale,
        BLOCK_P=block_p, GROUP=GROUP_SIZE, PACKED=p.packed, MAX_DIV_ULPS=MAX_DIV_ULPS, num_warps=num_warps,
    )
