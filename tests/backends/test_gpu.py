"""CUDA-only checks of the Triton backend (run by scripts/gpu_check.sh; skipped without a GPU).

Goldens, property tests, validation and slot handling (test_triton_slots.py) already run on CUDA
through the shared backends (tests/helpers.py); these add what only a GPU has: every 16-bit input pattern through the
real kernel, CUDA graphs, torch.compile, a non-default stream and large problems.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import as_bytes, each, poisoned, random_x
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]



def run_both(x: torch.Tensor, slots: torch.Tensor, n: int, cache_dtype, quant_mode: int, round_scale: bool, seed: int = 0):
    """(device result, CPU reference result) from identically poisoned outputs."""
    cache, scale = poisoned(n, x.shape[-1], cache_dtype, quant_mode, seed)
    want_c, want_s = cache.clone(), scale.clone()
    reference_indexer_compress_epilog(want_c, want_s, x.cpu(), slots.cpu(), quant_mode=quant_mode, round_scale=round_scale)
    cache, scale = cache.cuda(), scale.cuda()
    torch.ops.custom.indexer_compress_epilog(cache, scale, x.cuda(), slots.cuda(), quant_mode=quant_mode, round_scale=round_scale)
    return (cache, scale), (want_c, want_s)


def assert_same(got, want) -> None:
    np.testing.assert_array_equal(as_bytes(got[0]), as_bytes(want[0]))
    np.testing.assert_array_equal(as_bytes(got[1]), as_bytes(want[1]))


@each(cache_dtype=True, x_dtype=[torch.bfloat16, torch.float16])
def test_every_16bit_pattern_at_many_scales(x_dtype, cache_dtype, mode) -> None:
    """All 2^16 bit patterns (NaN, Inf, subnormals, ties) in groups shuffled into many different amaxes,
    and again multiplied by powers of two, through the real GPU kernel."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(x_dtype)
    g = torch.Generator().manual_seed(0)
    rows = [patterns.view(-1, 128), patterns[torch.randperm(patterns.numel(), generator=g)].view(-1, 128)]
    for k in (-8, 3):
        rows.append((patterns.float() * 2.0**k).to(x_dtype).view(-1, 128))
    x = torch.cat(rows)
    slots = torch.randperm(x.shape[0], generator=g)
    got, want = run_both(x, slots, x.shape[0], cache_dtype, *mode)
    assert_same(got, want)


@each()
@pytest.mark.parametrize("t,d", [(1, 128), (64, 128), (8, 4096)])
def test_cuda_graph_capture_and_replay(mode, t, d) -> None:
    quant_mode, round_scale = mode
    n = 128
    cache, scale = poisoned(n, d, torch.float8_e4m3fn, quant_mode, seed=5, device="cuda")
    x = torch.zeros(t, d, dtype=torch.bfloat16, device="cuda")
    slots = torch.full((t,), -1, dtype=torch.int64, device="cuda")
    call = lambda: torch.ops.custom.indexer_compress_epilog(  # noqa: E731
        cache, scale, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm-up compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for step in range(3):  # new inputs each replay, as a decode loop does
        x.copy_(random_x(t, d, torch.bfloat16, seed=10 + step, specials=3))
        s = torch.randperm(n)[:t]
        s[::3] = -1
        slots.copy_(s)
        want_c, want_s = cache.cpu().clone(), scale.cpu().clone()
        reference_indexer_compress_epilog(want_c, want_s, x.cpu(), slots.cpu(), quant_mode=quant_mode, round_scale=round_scale)
        graph.replay()
        torch.cuda.synchronize()
        assert_same((cache, scale), (want_c, want_s))


@each()
def test_torch_compile_fullgraph_cuda(mode) -> None:
    quant_mode, round_scale = mode
    torch._dynamo.reset()

    def write(cache, scale, x, slots):
        y = x * 2
        torch.ops.custom.indexer_compress_epilog(cache, scale, y, slots, quant_mode=quant_mode, round_scale=round_scale)
        return y.sum()

    # Inductor cannot write back a mutated e8m0 graph input in current torch (see test_op.py); MX uses
    # aot_eager, which still proves a single graph with no break.
    backend = "inductor" if quant_mode == 1 else "aot_eager"
    cache, scale = poisoned(64, 256, torch.float8_e4m3fn, quant_mode, seed=6, device="cuda")
    x = random_x(20, 256, torch.bfloat16, seed=7, device="cuda")
    slots = torch.randperm(64, device="cuda")[:20]
    want_c, want_s = cache.clone(), scale.clone()
    write(want_c, want_s, x, slots)
    torch.compile(write, fullgraph=True, backend=backend)(cache, scale, x, slots)
    assert_same((cache, scale), (want_c, want_s))


def test_non_default_stream() -> None:
    x = random_x(300, 4096, torch.bfloat16, seed=8)
    slots = torch.randperm(512)[:300]
    want_c, want_s = poisoned(512, 4096, torch.float8_e4m3fn, 1, seed=9)
    cache, scale = want_c.cuda(), want_s.cuda()
    reference_indexer_compress_epilog(want_c, want_s, x, slots)
    stream = torch.cuda.Stream()
    xd, sd = x.cuda(), slots.cuda()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.custom.indexer_compress_epilog(cache, scale, xd, sd)
    stream.synchronize()
    assert_same((cache, scale), (want_c, want_s))


def test_large_problem_matches_reference() -> None:
    """Tens of thousands of rows: enough programs to fill every SM, both tile configurations."""
    for t, d in [(40000, 128), (2000, 4096), (33, 5000)]:
        x = random_x(t, d, torch.bfloat16, seed=t, specials=100)
        slots = torch.randperm(t + 100)[:t]
        got, want = run_both(x, slots, t + 100, torch.float8_e4m3fn, 0, True, seed=t)
        assert_same(got, want)
