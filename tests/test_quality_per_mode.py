"""benchmarks/quality_per_mode.py's offline math (no vLLM, no server): the recall and agreement it reports, and that
its slot-store scoring is the plugin's paged reader bit for bit, in every mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality_per_mode as qpm  # noqa: E402

from vllm_indexer_epilog.integrations.dsv4_indexer_cpu.indexer_layout import (  # noqa: E402
    page_views, paged_mqa_logits, write_rows,
)

BS, PAGE, STRIDE = 64, 8640, 46080  # tiny config: rows per indexer page, page bytes, block stride of the pool


def test_recall_counts_misses() -> None:
    ref = torch.arange(10, dtype=torch.float32).flip(0).unsqueeze(0)  # position i scores 9 - i: top-4 = 0..3
    assert qpm.recall_at_k(torch.tensor([[0, 1, 2, 3]]), ref, k=4).item() == 1.0
    assert qpm.recall_at_k(torch.tensor([[0, 1, 8, 9]]), ref, k=4).item() == 0.5
    assert qpm.recall_at_k(torch.tensor([[6, 7, 8, 9]]), ref, k=4).item() == 0.0


def test_recall_is_tie_aware() -> None:
    # Positions 2, 3 and 4 tie for the last two places: either pick is a full recall, a lower one is not.
    ref = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0]])
    assert qpm.recall_at_k(torch.tensor([[0, 1, 3, 4]]), ref, k=4).item() == 1.0
    assert qpm.recall_at_k(torch.tensor([[0, 1, 4, 5]]), ref, k=4).item() == 0.75


def test_overlap() -> None:
    a = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    b = torch.tensor([[3, 2, 1, 0], [0, 1, 6, 7]])
    assert qpm.overlap(a, b, k=4).tolist() == [1.0, 0.5]


def test_topk_positions_matches_recall_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    top = qpm.topk_positions(logits, k=8)
    assert qpm.recall_at_k(top, logits, k=8).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("mode", list(qpm.MODES))
def test_store_scoring_is_the_plugin_reader(mode: str) -> None:
    """Keys written by the plugin's writer into vLLM-shaped pages and read by its reader (`paged_mqa_logits`) give
    the same logits, bit for bit, as the benchmark's quantize-to-slot-store and `score`; so its top-k is the
    server's for that mode (up to ties)."""
    layout = qpm.MODES[mode]
    g = torch.Generator().manual_seed(1)
    blocks, seqs, heads = 4, [150, 40, 200], 8
    pool = torch.zeros(blocks, STRIDE, dtype=torch.uint8)
    kv = pool[:, :PAGE]  # the indexer page of each block, strided like vLLM's per-layer view
    values, scales = page_views(kv, BS, layout)
    # Keys of varied magnitude per row, at shuffled slots; each sequence gets its own pages.
    page_table = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2], [3, 2, 1, 0]])
    store = qpm.KeyStore()
    x_all = (torch.randn(blocks * BS, 128, generator=g) * torch.rand(blocks * BS, 1, generator=g) * 4).bfloat16()
    slots = torch.randperm(blocks * BS, generator=g)
    write_rows(values, scales, x_all, slots, layout)
    codes, scale = qpm.quantize_keys(x_all, layout)
    store.write(slots, codes, scale)
    q = (torch.randn(len(seqs), heads, 128, generator=g) * 2).to(torch.float8_e4m3fn)
    weight = torch.randn(len(seqs), heads, generator=g)
    seq_lens = torch.tensor(seqs, dtype=torch.int32)
    want = paged_mqa_logits(q, kv, weight, seq_lens, page_table, BS, max(seqs), layout)
    got = qpm.score(qpm.fp8_to_float32(q), weight, seq_lens, page_table, BS, max(seqs), store)
    assert torch.equal(got, want)


def test_key_store_keeps_the_newest_row() -> None:
    store = qpm.KeyStore()
    store.write(torch.tensor([5]), torch.ones(1, 128), torch.tensor([2.0]))
    store.write(torch.tensor([5, 1]), torch.full((2, 128), 3.0), torch.tensor([4.0, 1.0]))
    codes, scale = store.gather(4)(torch.tensor([1, 0]), torch.tensor([1, 1]))
    assert scale.tolist() == [4.0, 1.0] and codes[0, 0].item() == 3.0
