"""The op in HiFloat8 mode (quant_mode=2, issue 16 item 1) on every backend and through every entry point,
against the en-dtypes oracle: every finite fp16 and bf16 value at several scales, poisoned outputs (rows no
valid slot names and the whole scale tensor stay as they were), -1, out-of-range and duplicate slots, the
packed-block pair, DAZ/FTZ, and dequantize. The cast itself is tested in test_hifloat8.py; argument errors in
test_validation.py and tests/backends/test_cpu_native.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Callable

import numpy as np
import pytest
import torch

from helpers import BACKENDS, ROOT, as_bytes, flushing_denormals, last_only
from vllm_indexer_epilog import dequantize, indexer_compress_epilog
from vllm_indexer_epilog.op.geometry import scales_after_values
from vllm_indexer_epilog.op.hifloat8 import decode_hifloat8
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

en_dtypes = pytest.importorskip("en_dtypes", reason="the HiF8 oracle is the en-dtypes package (test extra)")

# Inexact products (3, 1/448), binade shifts (2^±10), overflow (2^16) and underflow (2^-30).
SCALES = (1.0, 3.0, 1.0 / 448.0, 2.0**-10, 2.0**10, 2.0**16, 2.0**-30)
D = 128


def _all_finite(dtype: torch.dtype) -> torch.Tensor:
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return v[torch.isfinite(v.float())]


def oracle(x: torch.Tensor, scale: float) -> np.ndarray:
    """en-dtypes' cast of fl32(fl32(x) * fl32(scale)) (numpy float32 multiply: IEEE, no flushing)."""
    with np.errstate(over="ignore"):  # overflow to Inf is part of the contract
        return (x.float().numpy() * np.float32(scale)).astype(en_dtypes.hifloat8).view(np.uint8)


def _private_cpu(cache, scales, x, slots, *, quant_mode, round_scale, scale=1.0):
    from vllm_indexer_epilog.backends.cpu import load_cpu_kernel

    assert load_cpu_kernel()
    torch.ops.vllm_indexer_epilog_cpu.quantize_scatter(cache, scales, x, slots, quant_mode, round_scale, scale)


def _torch_ops(cache, scales, x, slots, *, quant_mode, round_scale, scale=1.0):
    if scale != 1.0:
        pytest.skip("our schema has no `scale`: torch.ops means scale 1.0 (the wrapper carries other scales)")
    BACKENDS["cpu_kernel"][0](cache, scales, x, slots, quant_mode=quant_mode, round_scale=round_scale)


def _npu_split(cache, scales, x, slots, **kw):
    from vllm_indexer_epilog.backends.npu import write_split

    write_split(cache, scales, x, slots, **kw)


# name -> (callable, exact last-row-wins on duplicates)
ENTRIES: dict[str, tuple[Callable[..., None], bool]] = {
    "torch_ops_cpu_kernel": (_torch_ops, True),
    "wrapper": (indexer_compress_epilog, True),
    "cpu_private_entry": (_private_cpu, True),
    "reference": (reference_indexer_compress_epilog, True),
    "npu_write_split": (_npu_split, True),
}
if "triton" in BACKENDS:
    ENTRIES["triton"] = (BACKENDS["triton"][0], False)


def _poisoned(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cache = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (n, (d + 127) // 128 * 4), generator=g, dtype=torch.uint8).view(torch.float32)
    return cache, scales


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scale", SCALES, ids=[f"s{s:g}" for s in SCALES])
def test_every_fp16_bf16_value_equals_en_dtypes(entry, dtype, scale) -> None:
    fn, _ = ENTRIES[entry]
    values = _all_finite(dtype)
    x = torch.cat([values, torch.zeros(-values.numel() % D, dtype=dtype)]).view(-1, D)
    t = x.shape[0]
    n = t + 5
    slots = torch.randperm(n, generator=torch.Generator().manual_seed(7))[:t]
    cache, scales = _poisoned(n, D, seed=1)
    before_c, before_s = cache.clone(), as_bytes(scales).copy()
    fn(cache, scales, x, slots, quant_mode=2, round_scale=True, scale=scale)
    np.testing.assert_array_equal(cache[slots].numpy(), oracle(x, scale))
    unnamed = torch.ones(n, dtype=torch.bool)
    unnamed[slots] = False
    assert torch.equal(cache[unnamed], before_c[unnamed]), "rows that no slot names were written"
    np.testing.assert_array_equal(as_bytes(scales), before_s, err_msg="the scale tensor was written")


def _specials_x(dtype: torch.dtype) -> torch.Tensor:
    vals = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 40960.0, -40959.0, 32768.0, 2.0**-23,
            -(2.0**-23), 1.5 * 2.0**-16, 1e-30, 65504.0]
    return torch.tensor(vals).to(dtype)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_skips_duplicates_and_specials(entry, x_dtype) -> None:
    """-1 skips; of several rows naming one slot the last wins (Triton: one of them); specials; d = 200
    (not a multiple of 128); int32 and int64 slots."""
    fn, last_wins = ENTRIES[entry]
    g = torch.Generator().manual_seed(3)
    t, d, n = 12, 200, 9
    x = (torch.randn(t, d, generator=g) * torch.exp2(torch.randint(-20, 20, (t, 1), generator=g).float())).to(x_dtype)
    sp = _specials_x(x_dtype)
    x[1, : sp.numel()] = sp
    for slot_dtype in (torch.int64, torch.int32):
        slots = torch.tensor([4, -1, 0, 4, 8, -1, 2, 0, 6, 1, 4, 7], dtype=slot_dtype)
        cache, scales = _poisoned(n, d, seed=2)
        before_c, before_s = cache.clone(), as_bytes(scales).copy()
        fn(cache, scales, x, slots, quant_mode=2, round_scale=False, scale=0.75)
        want = oracle(x, 0.75)
        keep = last_only(slots)
        for r in range(t):
            s = int(slots[r])
            if s < 0:
                continue
            if last_wins and int(keep[r]) < 0:
                continue
            rows_for_s = [i for i in range(t) if int(slots[i]) == s]
            got = cache[s].numpy()
            if last_wins:
                np.testing.assert_array_equal(got, want[r])
            else:
                assert any((got == want[i]).all() for i in rows_for_s)
        named = set(int(s) for s in slots if s >= 0)
        for s in range(n):
            if s not in named:
                assert torch.equal(cache[s], before_c[s])
        np.testing.assert_array_equal(as_bytes(scales), before_s)


def _packed(nb: int, bs: int, d: int, pad: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM-style pages: [bs * d HiF8 codes][bs * G float32 scale slots][pad], and the op's two views."""
    g = (d + 127) // 128
    page = bs * d + bs * g * 4 + pad
    raw = torch.randint(0, 256, (nb * page,), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    values = raw.as_strided((nb, bs, 1, d), (page, d, d, 1))
    return raw, values, scales_after_values(values, g, torch.float32)


@pytest.mark.parametrize("entry", ["wrapper", "cpu_private_entry", "reference", "triton", "npu_write_split"])
def test_packed_block_pair(entry) -> None:
    if entry not in ENTRIES:
        pytest.skip("unavailable here")
    fn, _ = ENTRIES[entry]
    nb, bs, d = 3, 8, 128
    raw, values, scales = _packed(nb, bs, d)
    before = raw.clone()
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(10, d, generator=g) * 300).to(torch.bfloat16)
    slots = torch.tensor([0, 23, -1, 9, 8, 15, 1, -1, 16, 7])
    fn(values, scales, x, slots, quant_mode=2, round_scale=True, scale=2.5)
    want = oracle(x, 2.5)
    flat = values.reshape(nb * bs, d)
    written = torch.zeros_like(raw, dtype=torch.bool)
    for r, s in enumerate(slots.tolist()):
        if s >= 0:
            np.testing.assert_array_equal(flat[s].numpy(), want[r])
            blk, off = divmod(s, bs)
            start = blk * values.stride(0) + off * d
            written[start:start + d] = True
    assert torch.equal(raw[~written], before[~written]), "bytes outside the named rows' codes changed"


@pytest.mark.parametrize("entry", ["wrapper", "cpu_private_entry", "reference"])
def test_subnormals_count_under_daz(entry) -> None:
    """float32 subnormal x times a large scale: the product uses x's exact value whatever the thread's
    FTZ/DAZ mode (docs/SPEC.md)."""
    fn, _ = ENTRIES[entry]
    x = torch.tensor([1, 3, 0x7FFFFF, 0x80000005, 0x00400001, 0x00800000] * 22, dtype=torch.int64)
    x = x.to(torch.int32).view(torch.float32)[:128].reshape(1, 128).contiguous()
    for scale in (2.0**110, 2.0**103 * 3):
        cache, scales = _poisoned(2, 128, 4)
        with flushing_denormals():
            fn(cache, scales, x, torch.tensor([1]), quant_mode=2, round_scale=True, scale=scale)
        np.testing.assert_array_equal(cache[1].numpy(), oracle(x, scale)[0])
        assert (cache[1] != 0).any()


def test_dequantize_decodes_exactly() -> None:
    x = _all_finite(torch.bfloat16)[: 510 * D].view(-1, D)
    cache, scales = _poisoned(x.shape[0], D, 0)
    slots = torch.arange(x.shape[0])
    indexer_compress_epilog(cache, scales, x, slots, quant_mode=2, scale=4.0)
    want = oracle(x, 4.0).view(en_dtypes.hifloat8).astype(np.float32) / np.float32(4.0)
    got = dequantize(cache, None, scale_value=4.0)
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    picked = dequantize(cache, scales, torch.tensor([2, -1]), scale_value=4.0)
    np.testing.assert_array_equal(picked[0].numpy(), got[2].numpy())
    assert picked[1].isnan().all()
    assert torch.equal(decode_hifloat8(cache), dequantize(cache, None))


def test_ascend_schema_entry_points_are_exact() -> None:
    """Where Ascend's schema (with `float scale`) is the registered one, torch.ops carries `scale` to our CPU
    kernel and the wrapper passes it: both equal en-dtypes on every finite fp16 value."""
    code = textwrap.dedent(
        """
        import numpy as np, torch, en_dtypes
        lib = torch.library.Library("custom", "DEF")
        lib.define("indexer_compress_epilog(Tensor(a!) indexer_compress_cache, Tensor(b!) indexer_compress_scale, "
                   "Tensor x, Tensor slot_mapping, *, int quant_mode=1, bool round_scale=True, float scale=1.0) -> ()")
        import vllm_indexer_epilog
        from vllm_indexer_epilog.backends import cpu
        v = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
        x = v[torch.isfinite(v.float())].view(-1, 128)
        slots = torch.arange(x.shape[0])
        for scale in (1.0, 3.0, 2.0**16, 1 / 448):
            want = (x.float().numpy() * np.float32(scale)).astype(en_dtypes.hifloat8).view(np.uint8)
            for call in (torch.ops.custom.indexer_compress_epilog, vllm_indexer_epilog.indexer_compress_epilog):
                cache, s = torch.zeros(x.shape, dtype=torch.uint8), torch.full((x.shape[0], 1), 9.0)
                call(cache, s, x, slots, quant_mode=2, scale=scale)
                assert (cache.numpy() == want).all() and (s == 9.0).all(), (call, scale)
        assert cpu.native_kernel_registered()
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
