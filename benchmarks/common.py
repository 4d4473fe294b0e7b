"""Shared pieces of the benchmark scripts: inputs, byte counts, table printing."""

from __future__ import annotations

import torch

from vllm_indexer_epilog.op.spec import SCALE_DTYPE_BY_MODE, num_groups


def make_inputs(
    t: int, d: int, *, device: str = "cpu", quant_mode: int = 1, cache_dtype: torch.dtype = torch.float8_e4m3fn,
    x_dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A realistic call: N = T slots (paged, block 64), shuffled slots, activations with outliers."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(t, d, generator=g) * torch.rand(t, 1, generator=g) * 4).to(x_dtype).to(device)
    n = max(64, (t + 63) // 64 * 64)
    slots = torch.randperm(n, generator=g)[:t].to(device)
    cache = torch.empty(n // 64, 64, d, dtype=cache_dtype, device=device)
    scale = torch.empty(n // 64, 64, num_groups(d), dtype=SCALE_DTYPE_BY_MODE[quant_mode], device=device)
    return cache, scale, x, slots


def bytes_moved(cache: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> int:
    """Bytes a one-pass kernel must read (x, slots) and write (one cache row and scale row per row of x)."""
    t, d = x.shape
    return t * d * x.element_size() + slots.numel() * slots.element_size() + t * d + t * num_groups(d) * scale.element_size()


def print_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = [
        "| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |",
        "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(str(r[c]).ljust(widths[c]) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def make_paged_inputs(
    t: int, d: int = 128, *, blocks: int = 1024, block_size: int = 64, quant_mode: int = 1,
    x_dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode-step call as vLLM makes it: a paged cache [blocks, block_size, 1, d] much larger than the
    T rows written, and int64 slots."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(t, d, generator=g) * 4).to(x_dtype)
    slots = torch.randperm(blocks * block_size, generator=g)[:t].to(torch.int64)
    cache = torch.zeros(blocks, block_size, 1, d, dtype=torch.float8_e4m3fn)
    scale = torch.zeros(blocks, block_size, 1, num_groups(d), dtype=SCALE_DTYPE_BY_MODE[quant_mode])
    return cache, scale, x, slots
