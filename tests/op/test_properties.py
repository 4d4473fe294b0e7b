"""Backends against the reference on random problems: poisoned outputs, fresh inputs, bytes compared.

Rows no slot names must come back with their poison untouched, so the whole cache and scale are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import BACKENDS, CACHE_DTYPES, MODES, X_DTYPES, as_bytes, backend_or_skip, poisoned, random_x
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog


@st.composite
def problems(draw, max_d: int, max_t: int):
    d = draw(st.one_of(st.integers(1, max_d), st.sampled_from([128, 256, 4096 if max_d >= 4096 else 128])))
    t = draw(st.integers(0, max_t))
    n = t + draw(st.integers(0, 40))
    n = max(n, 1)
    slot_style = draw(st.sampled_from(["shuffled", "with_skips", "all_skipped", "identity"]))
    return {
        "d": d, "t": t, "n": n,
        "x_dtype": draw(st.sampled_from(X_DTYPES)),
        "cache_dtype": draw(st.sampled_from(CACHE_DTYPES)),
        "mode": draw(st.sampled_from(MODES)),
        "slot_dtype": draw(st.sampled_from([torch.int32, torch.int64])),
        "slot_style": slot_style,
        "specials": draw(st.sampled_from([0, 0, 3, 50])),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "paged": draw(st.booleans()),
    }


def make_slots(p: dict, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(p["seed"] + 1)
    t, n = p["t"], p["n"]
    slots = torch.randperm(n, generator=g)[:t] if p["slot_style"] != "identity" else torch.arange(t)
    if p["slot_style"] == "with_skips":
        slots[torch.rand(t, generator=g) < 0.3] = -1
    elif p["slot_style"] == "all_skipped":
        slots[:] = -1
    return slots.to(p["slot_dtype"]).to(device)


def check_against_reference(fn, device: str, p: dict) -> None:
    quant_mode, round_scale = p["mode"]
    x = random_x(p["t"], p["d"], p["x_dtype"], p["seed"], specials=p["specials"], device=device)
    slots = make_slots(p, device)
    cache, scale = poisoned(p["n"], p["d"], p["cache_dtype"], quant_mode, p["seed"] + 2, device)
    if p["paged"] and p["n"] % 4 == 0:  # [num_blocks, block_size, 1, d] flattens to the same rows
        cache = cache.view(p["n"] // 4, 4, 1, p["d"])
        scale = scale.view(p["n"] // 4, 4, 1, -1)
    want_cache, want_scale = cache.cpu().clone(), scale.cpu().clone()
    reference_indexer_compress_epilog(
        want_cache, want_scale, x.cpu(), slots.cpu(), quant_mode=quant_mode, round_scale=round_scale
    )
    fn(cache, scale, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    np.testing.assert_array_equal(as_bytes(cache), as_bytes(want_cache), err_msg=f"cache differs for {p}")
    np.testing.assert_array_equal(as_bytes(scale), as_bytes(want_scale), err_msg=f"scale differs for {p}")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_d=5000, max_t=300))
def test_cpu_kernel_matches_reference(p: dict) -> None:
    fn, device = BACKENDS["cpu_kernel"]
    check_against_reference(fn, device, p)


# The interpreter runs each Triton program in numpy: fewer and smaller problems keep this in budget.
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_d=5000, max_t=64))
def test_triton_matches_reference(p: dict) -> None:
    check_against_reference(*backend_or_skip("triton"), p)


def test_large_rows_cpu_kernel_threads() -> None:
    """Enough rows for every thread to get work, in every mode, against the reference."""
    fn, device = BACKENDS["cpu_kernel"]
    for i, mode in enumerate(MODES):
        p = {"d": 4096, "t": 700, "n": 1024, "x_dtype": torch.bfloat16, "cache_dtype": torch.float8_e4m3fn,
             "mode": mode, "slot_dtype": torch.int64, "slot_style": "with_skips", "specials": 20, "seed": 100 + i,
             "paged": True}
        check_against_reference(fn, device, p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_d=5000, max_t=300))
def test_cuda_op_matches_reference(p: dict) -> None:
    """The op through the dispatcher on a GPU (Triton backend), when one is present."""
    check_against_reference(*backend_or_skip("cuda_op"), p)
