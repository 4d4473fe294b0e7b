"""Several rows naming one slot. The reference (and so every CPU path that falls back to it) leaves the last
such row's codes and scales, whole, on every run; strict mode rejects the call before writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import Mode, as_bytes, each, last_only, poisoned, random_x
from vllm_indexer_epilog import envs
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog



def crowded_slots(t: int, n: int, seed: int) -> torch.Tensor:
    """t rows over only n // 4 distinct slots, with skips: most slots are named several times."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, n // 4, (t,), generator=g)
    slots[torch.rand(t, generator=g) < 0.1] = -1
    return slots


@each()
@pytest.mark.parametrize("d", [128, 4096])
def test_last_row_wins_whole_on_every_run(monkeypatch, mode: Mode, d: int) -> None:
    monkeypatch.delenv(envs.STRICT, raising=False)
    quant_mode, round_scale = mode
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the reported tearing needed two threads racing on one indexed write
    try:
        t, n = 64, 32
        x = random_x(t, d, torch.bfloat16, seed=d, specials=5)
        slots = crowded_slots(t, n, seed=d + 1)
        want_c, want_s = poisoned(n, d, torch.float8_e4m3fn, quant_mode, seed=7)
        base_c, base_s = want_c.clone(), want_s.clone()
        reference_indexer_compress_epilog(want_c, want_s, x, last_only(slots), quant_mode=quant_mode,
                                          round_scale=round_scale)
        for _ in range(20):
            got_c, got_s = base_c.clone(), base_s.clone()
            reference_indexer_compress_epilog(got_c, got_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
            np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c))
            np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s))
    finally:
        torch.set_num_threads(threads)


def test_packed_layout_last_row_wins(monkeypatch) -> None:
    """The packed-block path writes through the same rows, so the same rule holds there."""
    monkeypatch.delenv(envs.STRICT, raising=False)
    nb, bs, d = 4, 8, 128
    page = bs * d + bs * 4
    raw = torch.randint(0, 256, (nb * page,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    values = torch.as_strided(raw.view(torch.float8_e4m3fn), (nb, bs, 1, d), (page, d, d, 1), 0)
    scales = torch.as_strided(raw.view(torch.float32), (nb, bs, 1, 1), (page // 4, 1, 1, 1), bs * d // 4)
    x = random_x(40, d, torch.bfloat16, seed=4)
    slots = crowded_slots(40, nb * bs * 4, seed=5)  # slots < 32: every block
    want = raw.clone()
    wv = torch.as_strided(want.view(torch.float8_e4m3fn), values.shape, values.stride(), 0)
    ws = torch.as_strided(want.view(torch.float32), scales.shape, scales.stride(), bs * d // 4)
    reference_indexer_compress_epilog(wv, ws, x, last_only(slots), packed=True)
    reference_indexer_compress_epilog(values, scales, x, slots, packed=True)
    assert torch.equal(raw, want)


@pytest.mark.parametrize("quant_mode", [0, 1])
def test_strict_mode_rejects_duplicates_on_cpu_before_writing(monkeypatch, quant_mode: int) -> None:
    monkeypatch.setenv(envs.STRICT, "1")
    cache, scale = poisoned(16, 200, torch.float8_e5m2, quant_mode, seed=8)
    before = (as_bytes(cache).copy(), as_bytes(scale).copy())
    x = random_x(4, 200, torch.float16, seed=9)
    with pytest.raises(ValueError, match="same cache row twice.*slot 5"):
        reference_indexer_compress_epilog(cache, scale, x, torch.tensor([5, -1, 5, 2]), quant_mode=quant_mode,
                                          round_scale=False)
    np.testing.assert_array_equal(as_bytes(cache), before[0])
    np.testing.assert_array_equal(as_bytes(scale), before[1])
    # -1 may repeat: skipped rows name no slot.
    reference_indexer_compress_epilog(cache, scale, x, torch.tensor([-1, -1, 5, 2]), quant_mode=quant_mode,
                                      round_scale=False)
