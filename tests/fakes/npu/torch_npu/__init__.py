"""Stand-in torch_npu: the two calls the indexer write sites make, recorded."""

from __future__ import annotations

import torch

CALLS: list[tuple[str, dict]] = []


def npu_dynamic_quant(x: torch.Tensor, dst_type: torch.dtype = torch.int8):
    """Per-row symmetric quantization (vllm-ascend's stock indexer-key path): codes and float32 row scales."""
    CALLS.append(("npu_dynamic_quant", {"shape": tuple(x.shape), "dst_type": dst_type}))
    top = 127.0 if dst_type == torch.int8 else torch.finfo(dst_type).max
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / top
    q = x.float() / scale.unsqueeze(-1)
    codes = q.round().clamp(-128, 127).to(torch.int8) if dst_type == torch.int8 else q.to(dst_type)
    return codes, scale


def npu_scatter_nd_update_(cache: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    CALLS.append(("npu_scatter_nd_update_", {"cache": tuple(cache.shape), "updates_dtype": updates.dtype}))
    rows = indices.reshape(-1).long()
    keep = rows >= 0
    cache[rows[keep]] = updates.reshape(rows.numel(), cache.shape[-1])[keep].to(cache.dtype)
    return cache
