"""The compat routing ops against per-token references written from vLLM's topk.cpp."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from compat_op_checks import real_op, scratch_library  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat import ops_router as orr  # noqa: E402

TINY = json.loads((Path(__file__).resolve().parents[3] / "configs/dsv4-tiny/config.json").read_text())


def _score_ref(x: float, func: str) -> float:
    if func == "sqrtsoftplus":
        if x < -15:
            return math.exp(x / 2)
        # The kernel forms 1 + exp(x) in float32 before the log; that rounding dominates for negative x.
        one_plus = float(np.float32(1.0) + np.float32(math.exp(x)))
        return math.sqrt(x if x > 20 else math.log(one_plus))
    return 1 / (1 + math.exp(-x))


def _biased_ref(logits, bias, topk, renorm, func, rsf, apply_out):
    out_w, out_i = [], []
    for row in logits.tolist():
        scores = [_score_ref(v, func) for v in row]
        order = sorted(range(len(row)), key=lambda e: -(scores[e] + float(bias[e])))[:topk]
        w = [scores[e] for e in order]
        if renorm:
            scale = 1 / sum(w) * (rsf if apply_out else 1.0)
            w = [v * scale for v in w]
        out_w.append(w)
        out_i.append(order)
    return torch.tensor(out_w, dtype=torch.float32), torch.tensor(out_i, dtype=torch.int32)


def _hash_ref(logits, tid2eid, func, rsf):
    out_w = []
    for row, eids in zip(logits.tolist(), tid2eid.tolist()):
        if func == "softmax":
            m = max(row)
            z = sum(math.exp(v - m) for v in row)
            scores = [math.exp(v - m) / z for v in row]
        else:
            scores = [_score_ref(v, func) for v in row]
        w = [scores[e] for e in eids]
        if func != "softmax":
            w = [v / sum(w) * rsf for v in w]
        out_w.append(w)
    return torch.tensor(out_w, dtype=torch.float32)


# float32 scores/sums vs a float64 reference: a few float32 ulps after the renormalisation.
TOL = dict(rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_experts,topk", [(TINY["n_routed_experts"], TINY["num_experts_per_tok"]), (4, 2), (64, 8)]
)
def test_biased_topk(num_experts: int, topk: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(num_experts + topk)
    logits = (torch.randn(37, num_experts, generator=gen) * 4).to(dtype)
    logits[0, :4] = torch.tensor([30.0, -30.0, 21.0, -16.0])  # both far branches of sqrtsoftplus
    bias = torch.randn(num_experts, generator=gen) * 0.5
    rsf = TINY["routed_scaling_factor"]
    w, i = orr.biased_topk(logits, logits, bias, topk, True, "sqrtsoftplus", 0, rsf, True)
    rw, ri = _biased_ref(logits.float(), bias, topk, True, "sqrtsoftplus", rsf, True)
    assert w.dtype == torch.float32 and i.dtype == torch.int32
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, **TOL)
    torch.testing.assert_close(w.sum(-1), torch.full((37,), rsf), rtol=1e-5, atol=0)


def test_biased_topk_variants() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 64, generator=gen)
    bias = torch.randn(64, generator=gen)
    w, i = orr.biased_topk(logits, logits, bias, 6, False, "sigmoid", 0, None, False)
    rw, ri = _biased_ref(logits, bias, 6, False, "sigmoid", 0.0, False)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, **TOL)
    # The kernel reads an absent scaling factor as 0.0.
    w0, _ = orr.biased_topk(logits, logits, bias, 6, True, "sigmoid", 0, None, True)
    assert torch.equal(w0, torch.zeros_like(w0))
    # Fused shared expert: last slot is a shared id, weighted by routed sum / factor, then renormalised.
    w, i = orr.biased_topk(logits, logits, bias, 7, True, "sqrtsoftplus", 2, 2.5, True)
    assert ((i[:, -1] >= 64) & (i[:, -1] < 66)).all()
    torch.testing.assert_close(w[:, :-1].sum(-1), torch.full((9,), 2.5), rtol=1e-5, atol=0)
    torch.testing.assert_close(w[:, -1], w[:, :-1].sum(-1) / 2.5, rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError):
        orr.biased_topk(logits, logits, bias, 6, True, "softmax", 0, 1.0, True)


@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("num_experts,topk", [(TINY["n_routed_experts"], TINY["num_experts_per_tok"]), (4, 4)])
def test_hash_topk(func: str, num_experts: int, topk: int) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(29, num_experts, generator=gen) * 3
    table = torch.randint(0, num_experts, (TINY["vocab_size"], topk), generator=gen, dtype=torch.int32)
    input_ids = torch.randint(0, TINY["vocab_size"], (29,), generator=gen)
    tid2eid = table[input_ids]
    rsf = TINY["routed_scaling_factor"]
    w, i = orr.hash_topk(logits, tid2eid, topk, func, 0, num_experts, rsf)
    assert torch.equal(i, tid2eid)
    torch.testing.assert_close(w, _hash_ref(logits, tid2eid, func, rsf), **TOL)


def test_hash_topk_fused_shared() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(11, 64, generator=gen)
    tid2eid = torch.randint(0, 64, (11, 6), generator=gen, dtype=torch.int32)
    w, i = orr.hash_topk(logits, tid2eid, 7, "sqrtsoftplus", 1, 64, 2.0)
    assert (i[:, -1] == 64).all() and torch.equal(i[:, :6], tid2eid)
    torch.testing.assert_close(w[:, :6].sum(-1), torch.ones(11), rtol=1e-5, atol=0)  # no factor when fused
    torch.testing.assert_close(w[:, -1], w[:, :6].sum(-1) / 2.0, rtol=1e-6, atol=0)


def test_fake_and_schema_on_scratch_namespace() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    lib = scratch_library(orr.OPS)  # noqa: F841  (alive while the test runs)
    logits = torch.randn(5, 256)
    bias = torch.zeros(256)
    w, i = torch.ops.vie_test_cmp.biased_topk_cpu(logits, logits, bias, 6, True, "sqrtsoftplus", 0, 1.5, True)
    assert w.shape == (5, 6) and i.dtype == torch.int32
    tid2eid = torch.randint(0, 256, (5, 6), dtype=torch.int32)
    with FakeTensorMode() as mode:
        fl, fb, ft = mode.from_tensor(logits), mode.from_tensor(bias), mode.from_tensor(tid2eid)
        w, i = torch.ops.vie_test_cmp.biased_topk_cpu(fl, fl, fb, 6, True, "sqrtsoftplus", 0, None, True)
        assert w.shape == (5, 6) and w.dtype == torch.float32 and i.dtype == torch.int32
        w, i = torch.ops.vie_test_cmp.hash_topk_cpu(fl, ft, 6, "sqrtsoftplus", 0, 256, 1.5)
        assert w.shape == (5, 6) and i.dtype == torch.int32


def test_against_vllm_real_op() -> None:
    biased, hashed = real_op("biased_topk_cpu"), real_op("hash_topk_cpu")
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(64, 256, generator=gen)
    bias = torch.randn(256, generator=gen) * 0.3
    rw, ri = biased(logits, logits, bias, 6, True, "sqrtsoftplus", 0, 1.5, True)
    w, i = orr.biased_topk(logits, logits, bias, 6, True, "sqrtsoftplus", 0, 1.5, True)
    # The kernel's exp_u20 is a low-accuracy exp: compare weights loosely, ids exactly.
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, rtol=1e-4, atol=1e-6)
    tid2eid = torch.randint(0, 256, (64, 6), generator=gen, dtype=torch.int32)
    rw, ri = hashed(logits, tid2eid, 6, "sqrtsoftplus", 0, 256, 1.5)
    w, i = orr.hash_topk(logits, tid2eid, 6, "sqrtsoftplus", 0, 256, 1.5)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, rtol=1e-4, atol=1e-6)
