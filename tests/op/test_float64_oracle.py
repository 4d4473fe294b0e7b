"""The package against an independent float64 model (tests/float64_oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import float64_oracle as oracle
from conftest import as_bytes, poisoned, random_x
from vllm_indexer_epilog.op.reference import encode_fp8
from vllm_indexer_epilog.op.spec import FP8_FORMATS

FMT_NAMES = ["float8_e4m3fn", "float8_e5m2"]


def every_16bit_value(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()


@pytest.mark.parametrize("name", FMT_NAMES)
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16])
def test_encoder_on_every_16bit_value_at_many_scales(name: str, src: torch.dtype) -> None:
    """All 2^16 bf16/fp16 patterns, divided by scales that put them on ties, subnormals and saturation."""
    fmt = FP8_FORMATS[getattr(torch, name)]
    base = every_16bit_value(src)
    for s in [1.0, 2.0**-20, 2.0**-9, 2.0**-6, 3.0, 0.1, 448 / 3, 2.0**10, 2.0**60, 1e-38]:
        q = (base.double() / s).float()
        got = encode_fp8(q, fmt).numpy()
        want = oracle.encode(q.numpy(), name)
        np.testing.assert_array_equal(got, want, err_msg=f"scale {s}")


@pytest.mark.parametrize("name", FMT_NAMES)
def test_encoder_on_random_float32_bits(name: str) -> None:
    fmt = FP8_FORMATS[getattr(torch, name)]
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    np.testing.assert_array_equal(encode_fp8(q, fmt).numpy(), oracle.encode(q.numpy(), name))


@pytest.mark.parametrize("name", FMT_NAMES)
@pytest.mark.parametrize("mode", [(1, True), (0, True), (0, False)], ids=["standard", "mx_ceil", "mx_floor"])
@pytest.mark.parametrize("d", [1, 128, 300])
def test_op_against_float64_model(name: str, mode: tuple[int, bool], d: int) -> None:
    quant_mode, round_scale = mode
    t = 24
    x = random_x(t, d, torch.bfloat16, seed=d + quant_mode, specials=12)
    x[3] = 0  # an all-zero row: S = 0 in standard mode, the MX floor otherwise
    cache, scale = poisoned(t, d, getattr(torch, name), quant_mode, seed=5)
    torch.ops.custom.indexer_compress_epilog(cache, scale, x, torch.arange(t), quant_mode=quant_mode, round_scale=round_scale)
    codes, scales = oracle.quantize(x.float().numpy(), name, quant_mode, round_scale)
    np.testing.assert_array_equal(as_bytes(cache), codes.reshape(-1))
    np.testing.assert_array_equal(as_bytes(scale), scales.view(np.uint8).reshape(-1))
