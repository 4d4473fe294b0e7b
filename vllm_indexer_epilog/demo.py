"""Demo: quantize a realistic indexer batch into a paged FP8 cache and report what happened.

A DeepSeek-V4-like prefill: 16384 tokens, one compressed indexer row (d = 128, bf16) per 4 tokens
(the others have slot -1, as in vLLM), written into a paged cache [blocks, 64, 1, 128], in each mode.
Prints scale statistics, the round-trip error against the input, and throughput against the torch
reference measured in the same run.

    python -m vllm_indexer_epilog.demo [--tokens N] [--dim D]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import dequantize, indexer_compress_epilog, reference_indexer_compress_epilog
from .op.spec import GROUP_SIZE, SCALE_DTYPE_BY_MODE, num_groups

BLOCK_SIZE = 64
MODES = (
    ("standard (float32 scales)", 1, True),
    ("MX, round_scale (e8m0, ceil)", 0, True),
    ("MX, OCP floor (e8m0)", 0, False),
)


def indexer_batch(tokens: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows like a compressor's output (RMS-normed, a few outlier channels) and vLLM-style slots."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g)
    x[:, torch.randperm(d, generator=g)[: max(1, d // 32)]] *= 8  # outlier channels
    x = (x / x.pow(2).mean(-1, keepdim=True).sqrt()).to(torch.bfloat16)
    closes = (torch.arange(tokens) % 4) == 3  # compress ratio 4: every 4th token closes a row
    n_rows = int(closes.sum())
    num_blocks = (n_rows + BLOCK_SIZE - 1) // BLOCK_SIZE + 4
    slots = torch.full((tokens,), -1, dtype=torch.int64)
    slots[closes] = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:n_rows]
    return x, slots, num_blocks


def timed(fn, reps: int = 21) -> float:
    """Median seconds per call, after warm-up calls that absorb thread-pool start and first-touch faults."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    x, slots, num_blocks = indexer_batch(args.tokens, args.dim)
    d, g = args.dim, num_groups(args.dim)
    valid = slots >= 0
    rows = int(valid.sum())
    print(f"indexer batch: {args.tokens} tokens, {rows} compressed rows of d={d} (bf16) -> paged cache "
          f"[{num_blocks}, {BLOCK_SIZE}, 1, {d}] float8_e4m3fn; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    for label, quant_mode, round_scale in MODES:
        cache = torch.zeros(num_blocks, BLOCK_SIZE, 1, d, dtype=torch.float8_e4m3fn)
        scale = torch.zeros(num_blocks, BLOCK_SIZE, 1, g, dtype=SCALE_DTYPE_BY_MODE[quant_mode])
        kw = {"quant_mode": quant_mode, "round_scale": round_scale}
        t_op = timed(lambda: indexer_compress_epilog(cache, scale, x, slots, **kw))
        ref_c, ref_s = torch.zeros_like(cache), torch.zeros_like(scale)
        t_ref = timed(lambda: reference_indexer_compress_epilog(ref_c, ref_s, x, slots, **kw), reps=3)
        exact = torch.equal(cache.view(torch.uint8), ref_c.view(torch.uint8)) and torch.equal(
            scale.view(torch.uint8), ref_s.view(torch.uint8))
        s = scale.reshape(-1, g).float()[slots[valid]]
        back = dequantize(cache, scale, slots[valid])
        xv = x[valid].float()
        rel_rms = ((back - xv).pow(2).mean() / xv.pow(2).mean()).sqrt().item()
        max_err_in_steps = ((back - xv).abs() / s.repeat_interleave(GROUP_SIZE, 1)[:, :d]).max().item()
        # Only rows with a slot are read: skipped rows cost the kernel their slot and nothing else.
        moved = rows * d * x.element_size() + slots.numel() * 8 + rows * (d + g * scale.element_size())
        print(f"== {label}")
        print(f"   rows written {rows}, skipped (slot -1) {args.tokens - rows}; bytes identical to reference: {exact}")
        print(f"   scales: min {s.min().item():.3g}  median {s.median().item():.3g}  max {s.max().item():.3g}"
              + (f"  (e8m0 exponents {int(torch.log2(s).min())}..{int(torch.log2(s).max())})" if quant_mode == 0 else ""))
        bound = "half the e4m3 step at 448 is 16" if quant_mode == 1 or round_scale else "OCP floor: |x|/S may reach 512 and saturate at 448"
        print(f"   round trip: relative RMS error {rel_rms:.4f}, max |error| {max_err_in_steps:.3f} x scale ({bound})")
        print(f"   throughput: {t_op * 1e3:.2f} ms/call, {moved / t_op / 1e9:.2f} GB/s, {rows / t_op / 1e6:.1f} M rows/s; "
              f"{t_ref / t_op:.1f}x the eager reference ({t_ref * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
