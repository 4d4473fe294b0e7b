"""Contract tests: DeepSeek-V3.2's LI-C8 indexer-key write on vllm-ascend, through the plugin's hook
(stand-in NPU layer). The write must become one fused op call on the two contiguous caches."""

from __future__ import annotations

import logging

import pytest
import torch

from fakes.ascend_standin import vllm_config
from helpers import poisoned, random_x
from vllm_indexer_epilog.integrations.config import EpilogConfigError
from vllm_indexer_epilog.integrations.vllm_ascend.sfa_li_c8 import SiteDrift
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

D = 128
N = 96  # cache rows: 6 blocks of 16


def _layer_and_caches(standin, flag=None, cls=None, **kw):
    layer = (cls or standin.sfa.AscendSFAImpl)(vllm_config(flag), **kw)
    k, s = poisoned(N, D, torch.float8_e4m3fn, 1, seed=11)
    kv_cache = (None, None, k.view(N // 16, 16, 1, D), s.view(N // 16, 16, 1, 1))
    return layer, kv_cache


def _batch(t=30, seed=0, slot_dtype=torch.int64):
    x = random_x(t, D, torch.bfloat16, seed, specials=5)
    slots = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:t].to(slot_dtype)
    slots[3::5] = -1
    return x, slots


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_li_c8_write_is_one_fused_op_call(boot, slot_dtype) -> None:
    standin = boot("A5")
    layer, kv_cache = _layer_and_caches(standin)
    x, slots = _batch(slot_dtype=slot_dtype)
    want_k, want_s = kv_cache[2].clone().view(N, D), kv_cache[3].clone().view(N, 1)
    reference_indexer_compress_epilog(want_k, want_s, x, slots)
    layer.forward("model.layers.0.self_attn", x, kv_cache, slots)

    assert torch.equal(kv_cache[2].view(N, D).view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(kv_cache[3].view(N, 1).view(torch.int32), want_s.view(torch.int32))
    # Neither the inline quantization nor the two scatters reached torch_npu; unrelated calls still do.
    assert standin.calls("npu_scatter_nd_update_") == []
    assert [c["dst_type"] for c in standin.calls("npu_dynamic_quant")] == [torch.int8]


def test_with_ascend_hadamard_the_rotated_key_is_written(boot) -> None:
    standin = boot("A5")
    h = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))[0].to(torch.bfloat16)
    standin.sfa.AscendSFAImpl.k_hadamard = h
    layer, kv_cache = _layer_and_caches(standin)
    x, slots = _batch(seed=2)
    x = x.clamp(-1e3, 1e3).nan_to_num(0.0)
    want_k, want_s = kv_cache[2].clone().view(N, D), kv_cache[3].clone().view(N, 1)
    reference_indexer_compress_epilog(want_k, want_s, x @ h, slots)
    layer.forward("l", x, kv_cache, slots)
    assert torch.equal(kv_cache[2].view(N, D).view(torch.uint8), want_k.view(torch.uint8))


def test_layers_without_li_c8_are_untouched(boot) -> None:
    standin = boot("A5")
    layer, kv_cache = _layer_and_caches(standin, enable_sparse_li_c8=False)
    kv_cache = (None, None, torch.zeros(N, D, dtype=torch.bfloat16), None)
    x, slots = _batch()
    layer.forward("l", x, kv_cache, slots)
    assert len(standin.calls("npu_scatter_nd_update_")) == 1  # vllm-ascend's own bf16 key scatter


@pytest.mark.parametrize(
    ("device", "flag", "kw", "why"),
    [
        ("A2", None, {}, "A2/A3"),
        ("A5", None, {"reshape_optim": True}, "store_kv_block"),
        ("A5", {"enabled": False}, {}, "disabled"),
    ],
)
def test_unsupported_configurations_keep_vllm_ascend_path(boot, caplog, device, flag, kw, why) -> None:
    standin = boot(device)
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    layer = standin.sfa.AscendSFAImpl(vllm_config(flag), **kw)
    assert layer._indexer_epilog is None
    assert any(why in r.getMessage() for r in caplog.records)
    dt, sdt = layer.c8_k_cache_dtype, layer.c8_k_scale_cache_dtype
    kv_cache = (None, None, torch.zeros(N, D, dtype=dt), torch.zeros(N, 1, dtype=sdt))
    x, slots = _batch()
    layer.forward("l", x, kv_cache, slots.clamp(min=0))
    assert len(standin.calls("npu_scatter_nd_update_")) == 2  # vllm-ascend's own key and scale scatters


def test_context_parallel_subclass_is_not_hooked(boot) -> None:
    standin = boot("A5")
    layer = standin.sfa.AscendSFAContextParallelImpl(vllm_config(None))
    assert layer._indexer_epilog is None


@pytest.mark.parametrize(
    ("flag", "match"),
    [
        ({"quant_mode": "mx"}, "no NPU reader of e8m0 scales"),
        ({"fp8_dtype": "e5m2"}, "float8_e4m3fn only"),
        ({"quant_mode": "hifloat8"}, "no vllm-ascend site reads HiFloat8"),
        ({"quant_mode": "standard", "round_scale": "yes"}, "round_scale"),
    ],
)
def test_unservable_or_bad_flag_fails_at_layer_build(boot, flag, match) -> None:
    standin = boot("A5")
    with pytest.raises(EpilogConfigError, match=match):
        standin.sfa.AscendSFAImpl(vllm_config(flag))


def test_explicit_flag_on_a2_fails_at_layer_build(boot) -> None:
    standin = boot("A3")
    with pytest.raises(EpilogConfigError, match="A2/A3"):
        standin.sfa.AscendSFAImpl(vllm_config({"quant_mode": "standard"}))


def test_a_write_out_of_the_expected_order_raises(boot) -> None:
    standin = boot("A5")
    layer, kv_cache = _layer_and_caches(standin)
    x, slots = _batch()
    layer.forward("l0", x, kv_cache, slots, skip_scale_scatter=True)
    with pytest.raises(SiteDrift, match="never written"):
        layer.forward("l1", x, kv_cache, slots)
    layer.forward("l1", x, kv_cache, slots)  # the next step starts clean


def test_bad_cache_is_named_and_left_untouched(boot) -> None:
    standin = boot("A5")
    layer, kv_cache = _layer_and_caches(standin)
    bad_scale = torch.zeros(N, 1, dtype=torch.float16)
    x, slots = _batch()
    before = kv_cache[2].clone()
    with pytest.raises(TypeError, match="indexer_compress_scale"):
        layer.forward("l", x, (None, None, kv_cache[2], bad_scale), slots)
    assert torch.equal(kv_cache[2].view(torch.uint8), before.view(torch.uint8))


def test_an_empty_batch_writes_nothing(boot) -> None:
    standin = boot("A5")
    layer, kv_cache = _layer_and_caches(standin)
    before = kv_cache[2].clone()
    empty = torch.empty(0, D, dtype=torch.bfloat16)
    layer.forward("l", empty, kv_cache, torch.empty(0, dtype=torch.int64))
    layer.forward("l", *_batch()[:1], kv_cache, _batch()[1])  # and the next step is hooked as usual
    assert standin.calls("npu_scatter_nd_update_")[:2] == [
        {"cache": (N, D), "updates_dtype": torch.float8_e4m3fn}, {"cache": (N, 1), "updates_dtype": torch.float32}]
    assert len(standin.calls("npu_scatter_nd_update_")) == 2
    assert not torch.equal(kv_cache[2].view(torch.uint8), before.view(torch.uint8))


@pytest.mark.parametrize(("reshape", "dsa_cp", "hooked"), [(False, False, True), (True, False, False), (False, True, False)])
def test_release_layout_probes(boot, monkeypatch, reshape, dsa_cp, hooked) -> None:
    """vllm-ascend 0.23.0/0.24.0rc1 have no _use_li_c8_reshape_optim/_prepare_kv_for_parallel: the hook reads
    the Ascend config and the layer's enable_dsa_cp instead."""
    from vllm_indexer_epilog.integrations import plugin

    standin = boot("A5")
    plugin.unregister()
    impl = standin.sfa.AscendSFAImpl
    monkeypatch.delattr(impl, "_use_li_c8_reshape_optim")
    monkeypatch.delattr(impl, "_prepare_kv_for_parallel")
    monkeypatch.setattr(impl, "forward", lambda self, *a, **k: None)
    monkeypatch.setattr(standin.sfa.ASCEND_CONFIG, "c8_enable_reshape_optim", reshape)
    plugin.register()
    original_init = impl.__init__

    def init_with_cp(self, *a, **k):
        self.enable_dsa_cp = dsa_cp
        original_init(self, *a, **k)

    monkeypatch.setattr(impl, "__init__", init_with_cp)
    layer = impl(vllm_config(None))
    assert (layer._indexer_epilog is not None) is hooked
