"""The CPU kernel's portable path (no AVX2: what other x86 CPUs get), built beside the native one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import GOLDEN_FILES, as_bytes, load_golden, poisoned, random_x
from vllm_indexer_epilog.backends.cpu import build_cpu_kernel
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

LIBRARY = "vllm_indexer_epilog_cpu_portable_test"


def _cpu_kernel_line() -> str:
    dump = torch._C._dispatch_dump("custom::indexer_compress_epilog")
    return next((line for line in dump.splitlines() if line.startswith("CPU:")), "")


@pytest.fixture(scope="module")
def portable_op():
    before = _cpu_kernel_line()
    build_cpu_kernel(march="x86-64", library=LIBRARY)
    # Loading a second build registers its own namespace only; custom::'s CPU kernel is untouched.
    assert _cpu_kernel_line() == before
    return getattr(torch.ops, LIBRARY).quantize_scatter


def test_portable_build_checks_arguments(portable_op) -> None:
    cache, scale = poisoned(8, 128, torch.float8_e4m3fn, 1, seed=0)
    before = (as_bytes(cache).copy(), as_bytes(scale).copy())
    x = random_x(2, 128, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="^slot_mapping values"):
        portable_op(cache, scale, x, torch.tensor([1, 8]), 1, True)
    with pytest.raises(ValueError, match="^indexer_compress_scale has 1 rows"):
        portable_op(cache, scale[:1].contiguous(), x, torch.tensor([1, 2]), 1, True)
    np.testing.assert_array_equal(as_bytes(cache), before[0])
    np.testing.assert_array_equal(as_bytes(scale), before[1])


def test_portable_build_golden(portable_op) -> None:
    for path in GOLDEN_FILES:
        g = load_golden(path)
        portable_op(g["cache"], g["scale"], g["x"], g["slot_mapping"], g["quant_mode"], g["round_scale"])
        np.testing.assert_array_equal(as_bytes(g["cache"]), g["cache_out"].reshape(-1), err_msg=path.name)
        np.testing.assert_array_equal(as_bytes(g["scale"]), g["scale_out"].reshape(-1), err_msg=path.name)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("mode", [(1, True), (0, True), (0, False)], ids=["standard", "mx_ceil", "mx_floor"])
def test_portable_build_matches_reference(portable_op, x_dtype, cache_dtype, mode) -> None:
    quant_mode, round_scale = mode
    for seed, d in enumerate([1, 128, 200, 4096, 257]):
        x = random_x(20, d, x_dtype, seed, specials=10)
        slots = torch.randperm(32)[:20]
        slots[::4] = -1
        got_c, got_s = poisoned(32, d, cache_dtype, quant_mode, seed)
        want_c, want_s = got_c.clone(), got_s.clone()
        portable_op(got_c, got_s, x, slots, quant_mode, round_scale)
        reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
        np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c))
        np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s))
