"""The Triton kernel's slot handling, on whatever device it runs (CPU interpreter here, CUDA there):
rows with slots outside [0, N) are skipped without a host check; strict mode checks and raises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import BACKENDS, as_bytes, each, poisoned, random_x

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")


@each()
def test_out_of_range_rows_skipped_without_error(mode, monkeypatch) -> None:
    monkeypatch.delenv("VLLM_INDEXER_EPILOG_STRICT", raising=False)
    fn, device = BACKENDS["triton"]
    quant_mode, round_scale = mode
    n, d = 16, 300
    # The cache is the middle of a larger buffer: the guard rows on both sides must not change.
    big_c, big_s = poisoned(n + 8, d, torch.float8_e4m3fn, quant_mode, seed=1, device=device)
    cache, scale = big_c[4 : 4 + n], big_s[4 : 4 + n]
    before_c, before_s = as_bytes(big_c).copy(), as_bytes(big_s).copy()
    x = random_x(6, d, torch.bfloat16, seed=2, device=device)
    slots = torch.tensor([n, -1, n + 3, -5, 2**40, 7], device=device)
    fn(cache, scale, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    rows_c = (as_bytes(big_c) != before_c).reshape(n + 8, -1).any(1)
    rows_s = (as_bytes(big_s) != before_s).reshape(n + 8, -1).any(1)
    assert np.nonzero(rows_c)[0].tolist() == [4 + 7] and np.nonzero(rows_s)[0].tolist() == [4 + 7]


def test_strict_mode_raises_before_writing(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_INDEXER_EPILOG_STRICT", "1")
    fn, device = BACKENDS["triton"]
    cache, scale = poisoned(8, 128, torch.float8_e4m3fn, 1, seed=3, device=device)
    x = random_x(2, 128, torch.bfloat16, seed=4, device=device)
    before = (as_bytes(cache).copy(), as_bytes(scale).copy())
    with pytest.raises(ValueError, match="slot_mapping values must lie in"):
        fn(cache, scale, x, torch.tensor([1, 8], device=device))
    with pytest.raises(ValueError, match="same cache row twice"):
        fn(cache, scale, x, torch.tensor([3, 3], device=device))
    np.testing.assert_array_equal(as_bytes(cache), before[0])
    np.testing.assert_array_equal(as_bytes(scale), before[1])
