"""HiFloat8 mode (quant_mode=2) of the Triton backend: a kernel of its own, dispatched from
`triton_kernel.triton_indexer_compress_epilog`.

Mode 2 has no groups and no scale to compute: each element of a row becomes HiF8(fl32(x * scale))
(docs/SPEC.md), written at its slot, and the scale tensor is never touched. So the kernel is a plain
[BLOCK_R rows, BLOCK_C columns] tile: load x as float32, one float32 multiply by the float32 `scale`
(IEEE round-to-nearest; Triton does not flush fp32 multiplies), encode with the integer-only
`hif8_triton.hif8_encode` (the same algorithm as op/hifloat8.py and csrc/hif8_codec.h), store.
Rows whose slot is -1 or outside [0, N) load and store nothing. Two rows naming one slot: one of them wins
(unspecified, as in the other modes here; strict mode rejects them).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import envs
from ..op.validation import check_slot_range, validate_epilog_args
from .hif8_triton import hif8_encode


@triton.jit
def hif8_epilog_kernel(
    x_ptr, slot_ptr, cache_ptr, scale,
    n_rows, n_slots, D,
    block_size, code_block_stride,  # packed-block pair only (PACKED)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PACKED: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = rows < n_rows
    slot = tl.load(slot_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    ok = in_range & (slot >= 0) & (slot < n_slots)
    if PACKED:
        # Slot s is row s % block_size of block s // block_size; blocks are code_block_stride bytes apart.
        blk = tl.where(ok, slot, 0) // block_size
        off = tl.where(ok, slot, 0) - blk * block_size
        code_row = blk * code_block_stride + off * D
    else:
        code_row = slot * D
    mask = ok[:, None] & (cols < D)[None, :]
    xv = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    code = hif8_encode(xv * scale)
    tl.store(cache_ptr + code_row[:, None] + cols[None, :], code, mask=mask)


def triton_hif8_epilog(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    quant_mode: int = 2,
    round_scale: bool = True,
    scale: float = 1.0,
) -> None:
    """The op in HiFloat8 mode on x's device (CUDA, or CPU under TRITON_INTERPRET=1): the shared checks, then
    the codes of every row with a valid slot (indexer_compress_scale is validated, never written)."""
    p = validate_epilog_args(indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode, round_scale,
                             scale_value=scale)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if envs.strict() and not capturing:  # a capture cannot sync; replays keep the on-device skip
        check_slot_range(slot_mapping, p.slots, reject_duplicates=True)
    if p.rows == 0:
        return
    cache = indexer_compress_cache
    block_c = min(triton.next_power_of_2(p.dim), 1024)
    block_r = max(1, min(16, 4096 // block_c))
    geo = p.geometry
    grid = (triton.cdiv(p.rows, block_r), triton.cdiv(p.dim, block_c))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        hif8_epilog_kernel[grid](
            x, slot_mapping, cache, p.scale,
            p.rows, p.slots, p.dim,
            max(geo.block_size, 1), geo.block_bytes if p.packed else 0,
            BLOCK_R=block_r, BLOCK_C=block_c, PACKED=p.packed, num_warps=4,
        )
