"""The package against an independent float64 model (tests/float64_oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import float64_oracle as oracle
from helpers import BACKENDS, Mode, as_bytes, each, flushing_denormals, poisoned, random_x
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
@each()
@pytest.mark.parametrize("d", [1, 128, 300])
def test_op_against_float64_model(name: str, mode: Mode, d: int) -> None:
    quant_mode, round_scale = mode
    t = 24
    x = random_x(t, d, torch.bfloat16, seed=d + quant_mode, specials=12)
    x[3] = 0  # an all-zero row: S = 0 in standard mode, the MX floor otherwise
    cache, scale = poisoned(t, d, getattr(torch, name), quant_mode, seed=5)
    torch.ops.custom.indexer_compress_epilog(cache, scale, x, torch.arange(t), quant_mode=quant_mode, round_scale=round_scale)
    codes, scales = oracle.quantize(x.float().numpy(), name, quant_mode, round_scale)
    np.testing.assert_array_equal(as_bytes(cache), codes.reshape(-1))
    np.testing.assert_array_equal(as_bytes(scale), scales.view(np.uint8).reshape(-1))


def tiny_rows(t: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows whose groups reach down into float32's subnormal range (bf16/float32 carry such values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g) * torch.exp2(-torch.randint(100, 150, (t, 1), generator=g).float())
    return x.to(dtype)


@pytest.mark.parametrize("name", FMT_NAMES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend_name", ["reference", "cpu_kernel"])
@each()
def test_tiny_values_exact_under_flush_denormal(name: str, x_dtype: torch.dtype, backend_name: str, mode: Mode) -> None:
    """Under torch.set_flush_denormal(True) the standard scale of a tiny group is a float32 subnormal and its
    inputs are subnormals: the bytes must still be the float64 model's, on every poisoned byte."""
    quant_mode, round_scale = mode
    fn, _ = BACKENDS[backend_name]
    t, d = 48, 256
    x = tiny_rows(t, d, x_dtype, seed=31)
    cache, scale = poisoned(t + 8, d, getattr(torch, name), quant_mode, seed=32)
    slots = torch.randperm(t + 8, generator=torch.Generator().manual_seed(33))[:t]
    want_c, want_s = as_bytes(cache).copy(), as_bytes(scale).copy()
    codes, scales = oracle.quantize(x.float().numpy(), name, quant_mode, round_scale)
    d_bytes, s_bytes = want_c.reshape(t + 8, -1), want_s.reshape(t + 8, -1)
    d_bytes[slots.numpy()] = codes
    s_bytes[slots.numpy()] = scales.view(np.uint8).reshape(t, -1)
    with flushing_denormals():
        fn(cache, scale, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    np.testing.assert_array_equal(as_bytes(cache), want_c)
    np.testing.assert_array_equal(as_bytes(scale), want_s)
