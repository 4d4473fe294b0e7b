"""The compat mHC ops against vLLM's torch twins (mhc_pre_torch, mhc_post_torch) and a naive hc_head loop."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from compat_op_checks import real_op, scratch_library  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat import ops_mhc as om  # noqa: E402

HC, D, SINKHORN, RMS_EPS, HC_EPS = 4, 256, 4, 1e-6, 1e-6  # configs/dsv4-tiny: hc_mult 4, hidden 256


def _inputs(t: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mix = (2 + HC) * HC
    x = torch.randn(t, HC, D, generator=gen).to(torch.bfloat16)
    fn = torch.randn(mix, HC * D, generator=gen) * 0.05
    scale = torch.tensor([0.7, 1.3, 0.9])
    base = torch.randn(mix, generator=gen) * 0.2
    return x, fn, scale, base


def _bf16_close(a: torch.Tensor, b: torch.Tensor) -> None:
    # bf16 outputs of float32 sums taken in different orders: at most one bf16 rounding step apart.
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2.0**-7, atol=1e-5)


def test_hc_pre_matches_torch_twin() -> None:
    from vllm.model_executor.kernels.mhc.torch import mhc_pre_torch

    x, fn, scale, base = _inputs(19)
    y, post, comb = om.hc_pre_fused(x, fn, scale, base, HC, SINKHORN, RMS_EPS, HC_EPS)
    rpost, rcomb, ry = mhc_pre_torch(x, fn, scale, base, RMS_EPS, HC_EPS, HC_EPS, 2.0, SINKHORN)
    assert y.shape == (19, D) and post.shape == (19, HC) and comb.shape == (19, HC, HC)
    assert post.dtype == comb.dtype == torch.float32
    # float32 matmul/sums in another order (and the rms sum in double): a few float32 ulps.
    torch.testing.assert_close(post, rpost.reshape(19, HC), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, rcomb, rtol=1e-5, atol=1e-6)
    _bf16_close(y, ry)


def test_hc_post_matches_torch_twin() -> None:
    from vllm.model_executor.kernels.mhc.torch import mhc_post_torch

    gen = torch.Generator().manual_seed(1)
    t = 17
    x = torch.randn(t, D, generator=gen).to(torch.bfloat16)
    residual = torch.randn(t, HC, D, generator=gen).to(torch.bfloat16)
    post = torch.rand(t, HC, generator=gen) * 2
    comb = torch.rand(t, HC, HC, generator=gen)
    out = om.hc_post_fused(x, residual, post, comb)
    ref = mhc_post_torch(x, residual, post.unsqueeze(-1), comb)
    assert out.shape == (t, HC, D)
    _bf16_close(out, ref)


def _hc_head_ref(x, fn, scale, base, hc_eps, norm_eps):
    """Per-token loop written from hc_head_fuse_impl, in float64."""
    t, hc, d = x.shape
    out = torch.empty(t, d, dtype=torch.float64)
    xd, fnd = x.double(), fn.double()
    for i in range(t):
        flat = xd[i].reshape(-1)
        inv_rms = 1.0 / math.sqrt(float((flat * flat).sum()) / (hc * d) + norm_eps)
        acc = torch.zeros(d, dtype=torch.float64)
        for h in range(hc):
            gate = float(flat @ fnd[h]) * inv_rms * float(scale[0]) + float(base[h])
            acc += (1.0 / (1.0 + math.exp(-gate)) + hc_eps) * xd[i, h]
        out[i] = acc
    return out.to(torch.bfloat16)


def test_hc_head_matches_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(13, HC, D, generator=gen).to(torch.bfloat16)
    fn = torch.randn(HC, HC * D, generator=gen) * 0.05
    scale = torch.tensor([0.8])
    base = torch.randn(HC, generator=gen) * 0.2
    y = om.hc_head_fused(x, fn, scale, base, HC_EPS, RMS_EPS)
    _bf16_close(y, _hc_head_ref(x, fn, scale, base, HC_EPS, RMS_EPS))


def test_fake_and_schema_on_scratch_namespace() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    lib = scratch_library(om.OPS)  # noqa: F841  (alive while the test runs)
    x, fn, scale, base = _inputs(3)
    y, post, comb = torch.ops.vie_test_cmp.hc_pre_fused_cpu(x, fn, scale, base, HC, SINKHORN, RMS_EPS, HC_EPS)
    hfn, hs, hb = fn[:HC].contiguous(), scale[:1].clone(), base[:HC].clone()
    with FakeTensorMode() as mode:
        fx, ff, fs, fb = (mode.from_tensor(a) for a in (x, fn, scale, base))
        fy, fp, fc = torch.ops.vie_test_cmp.hc_pre_fused_cpu(fx, ff, fs, fb, HC, SINKHORN, RMS_EPS, HC_EPS)
        assert (fy.shape, fp.shape, fc.shape) == (y.shape, post.shape, comb.shape)
        assert fy.dtype == torch.bfloat16 and fp.dtype == fc.dtype == torch.float32
        out = torch.ops.vie_test_cmp.hc_post_fused_cpu(fy, fx, fp, fc)
        assert out.shape == (3, HC, D) and out.dtype == torch.bfloat16
        head = torch.ops.vie_test_cmp.hc_head_fused_cpu(
            fx, mode.from_tensor(hfn), mode.from_tensor(hs), mode.from_tensor(hb), HC_EPS, RMS_EPS
        )
        assert head.shape == (3, D)


def test_against_vllm_real_op() -> None:
    pre, post_op, head = real_op("hc_pre_fused_cpu"), real_op("hc_post_fused_cpu"), real_op("hc_head_fused_cpu")
    x, fn, scale, base = _inputs(41, seed=4)
    ry, rp, rc = pre(x, fn, scale, base, HC, SINKHORN, RMS_EPS, HC_EPS)
    y, p, c = om.hc_pre_fused(x, fn, scale, base, HC, SINKHORN, RMS_EPS, HC_EPS)
    torch.testing.assert_close(p, rp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, rc, rtol=1e-5, atol=1e-6)
    _bf16_close(y, ry)
    _bf16_close(om.hc_post_fused(y, x, p, c), post_op(y, x, p, c))
    hfn, hs, hb = fn[:HC].contiguous(), scale[:1].clone(), base[:HC].clone()
    _bf16_close(om.hc_head_fused(x, hfn, hs, hb, HC_EPS, RMS_EPS), head(x, hfn, hs, hb, HC_EPS, RMS_EPS))
