"""dequantize() inverts the op to within half an fp8 step at each group's scale."""

from __future__ import annotations

import pytest
import torch

from helpers import each, poisoned, random_x
from vllm_indexer_epilog import dequantize, indexer_compress_epilog
from vllm_indexer_epilog.op.spec import FP8_FORMATS, GROUP_SIZE


def half_step(q: torch.Tensor, fmt) -> torch.Tensor:
    """Half the fp8 spacing at |q| (q in units of the scale), float64."""
    a = q.abs().double()
    min_exp = 1 - fmt.exponent_bias
    e = torch.floor(torch.log2(a.clamp(min=2.0**min_exp))).clamp(min=min_exp)
    return 0.5 * torch.exp2(e - fmt.mantissa_bits)


@each(cache_dtype=True, x_dtype=True)
def test_round_trip_within_half_step(cache_dtype, mode, x_dtype) -> None:
    quant_mode, round_scale = mode
    fmt = FP8_FORMATS[cache_dtype]
    t, d, n = 50, 300, 64
    x = random_x(t, d, x_dtype, seed=9)
    slots = torch.randperm(n)[:t]
    cache, scale = poisoned(n, d, cache_dtype, quant_mode, seed=10)
    indexer_compress_epilog(cache, scale, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    back = dequantize(cache, scale, slots).double()
    s = scale.reshape(n, -1).float()[slots].double().repeat_interleave(GROUP_SIZE, dim=1)[:, :d]
    xd = x.double()
    err = (back - xd).abs()
    bound = half_step(xd / s, fmt) * s
    finite = torch.isfinite(xd)  # fp16 overflows the largest rows to Inf: those saturate by contract
    # MX floor mode (OCP) lets |x|/S reach 512 > FMAX: those elements saturate by design. Otherwise
    # |x|/S <= FMAX up to the rounding of S = amax/FMAX.
    saturated = (xd / s).abs() > fmt.fmax * (1 + 2.0**-20)
    # Slack for the float32 roundings of x/S and of code*S (a few ulps of x).
    slack = xd.abs() * 2.0**-22
    ok = (err <= bound + slack) | saturated | ~finite
    assert bool(ok.all()), float((err - bound)[~ok].max())
    if quant_mode == 1 or round_scale:
        assert not bool((saturated & finite).any())


def test_dequantize_skipped_slots_are_nan_and_zero_scale_is_zero() -> None:
    cache, scale = poisoned(4, 128, torch.float8_e4m3fn, 1, seed=1)
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    indexer_compress_epilog(cache, scale, x, torch.tensor([2]))
    out = dequantize(cache, scale, torch.tensor([2, -1]))
    assert torch.equal(out[0], torch.zeros(128)) and bool(out[1].isnan().all())


def test_dequantize_rejects_bad_scale() -> None:
    cache = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale must have shape"):
        dequantize(cache, torch.zeros(4, 2))
    with pytest.raises(TypeError, match="cache must be"):
        dequantize(cache.view(torch.int8), torch.zeros(4, 1))  # uint8 is HiFloat8 (test_hifloat8_op.py)
