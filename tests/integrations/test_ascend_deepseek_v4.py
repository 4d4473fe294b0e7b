"""Contract tests: DeepSeek-V4's indexer cache on vllm-ascend, through the plugin's hook (stand-in NPU layer).

Proves which calls reach the Ascend ops (tensors, shapes, dtypes, strides, slots, mode), the bytes they
leave in the packed pages, what the lightning indexer is handed to read, and the refusals.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fakes.ascend_standin import carve_packed, expected_packed, vllm_config
from helpers import random_x
from vllm_indexer_epilog.integrations.config import EpilogConfigError
from vllm_indexer_epilog.integrations.vllm_ascend import deepseek_v4_indexer as hook
from vllm_indexer_epilog.op.spec import QUANT_MODE_MX, QUANT_MODE_STANDARD

D = 128


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)

MX = {"quant_mode": "mx"}
MX_OCP = {"quant_mode": "mx", "round_scale": False}


def _cache_and_batch(standin, flag, *, blocks=5, bs=16, pad=0, tokens=40, seed=0, slot_dtype=torch.int64):
    layer = standin.indexer.AscendDeepseekV4IndexerCache(D, torch.bfloat16, "model.layers.0.attn.indexer.k_cache")
    spec = layer.get_kv_cache_spec(vllm_config(flag, block_size=bs))
    cache = carve_packed(spec, blocks, pad=pad, seed=seed)
    x = random_x(tokens, D, torch.bfloat16, seed, specials=7)
    g = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(blocks * bs, generator=g)[:tokens].to(slot_dtype)
    slots[::4] = -1  # tokens that close no compressed group
    return spec, cache, x, slots


def _expected_mx(cache, x, slots, round_scale):
    """MX on the standard page: MX codes, and each row's e8m0 scale stored as the float32 2^e it stands for."""
    from vllm_indexer_epilog.op.dequant import mx_scales_to_float32
    from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

    nb, bs, _, d = cache.values.shape
    rows_v = cache.values.reshape(nb * bs, d).clone()
    rows_s = cache.scales.reshape(nb * bs, 1).clone()
    e8 = torch.zeros(nb * bs, 1, dtype=torch.float8_e8m0fnu)
    reference_indexer_compress_epilog(rows_v, e8, x, slots, quant_mode=QUANT_MODE_MX, round_scale=round_scale)
    written = slots[slots >= 0].long()
    rows_s[written] = mx_scales_to_float32(e8[written])
    want = cache.raw.clone()
    pages = want.view(nb, cache.page)
    pages[:, : bs * d] = rows_v.view(torch.uint8).view(nb, bs * d)
    pages[:, bs * d: bs * (d + 4)] = rows_s.view(torch.uint8).view(nb, bs * 4)
    return want


@pytest.mark.parametrize(
    ("flag", "scale_dtype"),
    [(None, torch.float32), ({"quant_mode": "standard"}, torch.float32), (MX, torch.float32)],
)
def test_allocation_follows_the_mode(boot, flag, scale_dtype) -> None:
    standin = boot("A5")
    layer = standin.indexer.AscendDeepseekV4IndexerCache(D, torch.bfloat16)
    spec = layer.get_kv_cache_spec(vllm_config(flag, block_size=64))
    assert (spec.dtype, spec.scale_dtype, spec.scale_dim) == (torch.float8_e4m3fn, scale_dtype, 1)
    # The page the block manager counts holds every row's values and its scale, nothing more or less.
    assert spec.page_size_bytes == 64 * (D + torch.empty((), dtype=scale_dtype).element_size())


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_standard_mode_writes_through_v2(boot, slot_dtype) -> None:
    standin = boot("A5")
    spec, cache, x, slots = _cache_and_batch(standin, None, pad=64, slot_dtype=slot_dtype)
    want = expected_packed(cache, x, slots, QUANT_MODE_STANDARD, True)
    ops = standin.indexer.AscendIndexerOps()
    q = torch.randn(8, 2, D, dtype=torch.bfloat16)
    ops.quantize_update_cache_and_select_topk(q, x, cache.values, cache.scales, cache.full, slots)

    (call,) = standin.v2_calls
    nb, bs = cache.values.shape[:2]
    assert call["shape"] == (nb, bs, 1, D + 4) and call["block_stride"] == cache.page
    assert call["storage"] == cache.raw.untyped_storage().data_ptr() and call["offset"] == 0
    assert call["x"].data_ptr() == x.data_ptr() and call["slots"].dtype == torch.int32 and torch.equal(call["slots"].long(), slots.long())
    assert torch.equal(cache.raw, want)
    # The query is still quantized by vllm-ascend's own call, and the indexer reads float32 scales.
    assert [c["dst_type"] for c in standin.calls("npu_dynamic_quant")] == [torch.float8_e4m3fn]
    (read,) = ops.reads
    assert read["key_dequant_scale"].dtype == torch.float32
    assert torch.equal(as_bytes(read["key_dequant_scale"]), as_bytes(cache.scales.squeeze(-2)))


@pytest.mark.parametrize("flag", [MX, MX_OCP])
def test_mx_mode_keeps_the_standard_page_and_the_reader_gets_powers_of_two(boot, flag) -> None:
    standin = boot("A5")
    spec, cache, x, slots = _cache_and_batch(standin, flag, seed=3)
    assert spec.scale_dtype == torch.float32  # issue #13 gap 2: the page (and KV-cache plan) of standard mode
    want = _expected_mx(cache, x, slots, flag.get("round_scale", True))
    ops = standin.indexer.AscendIndexerOps()
    ops.quantize_update_cache_and_select_topk(torch.randn(4, D, dtype=torch.bfloat16), x, cache.values,
                                              cache.scales, cache.full, slots)
    assert standin.v2_calls == []  # v2 quantizes in standard mode only: the registered op wrote the rows
    assert torch.equal(cache.raw, want)
    (read,) = ops.reads
    key_scale = read["key_dequant_scale"]
    assert key_scale.dtype == torch.float32 and key_scale.shape == cache.scales.squeeze(-2).shape
    written = slots[slots >= 0]
    got = key_scale.reshape(-1)[written]
    assert torch.equal(got, cache.scales.reshape(-1)[written].float())  # exact powers of two


@pytest.mark.parametrize("flag", [None, MX])
def test_split_stream_part1_writes_values_and_scales_and_skips_part3(boot, flag) -> None:
    standin = boot("A5")
    spec, cache, x, slots = _cache_and_batch(standin, flag, pad=32, seed=5)
    want = _expected_mx(cache, x, slots, True) if flag else expected_packed(cache, x, slots, QUANT_MODE_STANDARD, True)
    ops = standin.indexer.AscendIndexerOps()
    ops.split_stream_update(x, cache.values, cache.scales, cache.full, slots)
    assert len(standin.v2_calls) == (0 if flag else 1)
    assert standin.calls("npu_scatter_nd_update_") == []  # no separate scale scatter (part 3)
    assert torch.equal(cache.raw, want)
    assert ops.quantize_key_and_update_cache(None, cache.values, cache.full, slots) == (None, None)


def test_out_of_range_slots_never_write_outside(boot) -> None:
    standin = boot("A5")
    spec, cache, x, slots = _cache_and_batch(standin, MX, blocks=3, tokens=20)
    bad = slots.clone()
    bad[1], bad[2] = 3 * 16, -7  # one past the last row; below -1
    guarded = torch.where((bad >= -1) & (bad < 48), bad, -1)
    want = _expected_mx(cache, x, guarded, True)
    standin.indexer.AscendIndexerOps().split_stream_update(x, cache.values, cache.scales, cache.full, bad)
    assert torch.equal(cache.raw, want)


def test_strict_mode_raises_before_writing(boot, monkeypatch) -> None:
    standin = boot("A5")
    monkeypatch.setenv("VLLM_INDEXER_EPILOG_STRICT", "1")
    spec, cache, x, slots = _cache_and_batch(standin, None)
    slots[0] = 10_000
    before = cache.raw.clone()
    with pytest.raises(ValueError, match="slot_mapping"):
        standin.indexer.AscendIndexerOps().split_stream_update(x, cache.values, cache.scales, cache.full, slots)
    assert torch.equal(cache.raw, before) and standin.v2_calls == []


@pytest.mark.parametrize("where", ["model", "additional"])
def test_flag_is_read_from_either_config_place(boot, where) -> None:
    standin = boot("A5")
    layer = standin.indexer.AscendDeepseekV4IndexerCache(D, torch.bfloat16)
    spec = layer.get_kv_cache_spec(vllm_config(MX, where=where))
    assert spec.scale_dtype == torch.float32 and hook.state.config.quant_mode == QUANT_MODE_MX


def test_a2_without_flag_keeps_vllm_ascend_int8_path(boot, caplog) -> None:
    standin = boot("A2")
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    layer = standin.indexer.AscendDeepseekV4IndexerCache(D, torch.bfloat16)
    spec = layer.get_kv_cache_spec(vllm_config(None))
    assert (spec.dtype, spec.scale_dtype) == (torch.bfloat16, torch.float16) and hook.state.config is None
    assert any("inactive" in r.getMessage() and "A2/A3" in r.getMessage() for r in caplog.records)
    k = torch.zeros(64, D, dtype=torch.int8)
    s = torch.zeros(64, 1, dtype=torch.float16)
    standin.indexer.AscendIndexerOps().split_stream_update(torch.randn(4, D), k, s, None, torch.arange(4))
    assert standin.calls("npu_dynamic_quant")[0]["dst_type"] == torch.int8  # vllm-ascend's own write ran


@pytest.mark.parametrize(
    ("device", "flag", "match"),
    [
        ("A2", {"quant_mode": "standard"}, "A2/A3"),
        ("A3", MX, "no NPU reader of FP8 indexer keys"),
        ("A5", {"fp8_dtype": "float8_e5m2"}, "float8_e4m3fn keys only"),
        ("A5", {"quant_mode": "hifloat8"}, "no vllm-ascend site reads HiFloat8"),
        ("A5", {"quant_mode": "int8"}, "quant_mode"),
        ("A5", {"quantmode": "mx"}, "unknown"),
    ],
)
def test_unservable_or_bad_flag_fails_at_allocation(boot, device, flag, match) -> None:
    standin = boot(device)
    layer = standin.indexer.AscendDeepseekV4IndexerCache(D, torch.bfloat16)
    with pytest.raises(EpilogConfigError, match=match):
        layer.get_kv_cache_spec(vllm_config(flag))


def test_enabled_false_leaves_everything_to_vllm_ascend(boot) -> None:
    standin = boot("A5")
    spec, cache, x, slots = _cache_and_batch(standin, {"enabled": False, "quant_mode": "mx"})
    assert spec.scale_dtype == torch.float32 and hook.state.config is None
    standin.indexer.AscendIndexerOps().split_stream_update(x, cache.values, cache.scales, cache.full,
                                                           slots.to(torch.int32))
    (call,) = standin.v2_calls  # vllm-ascend's own call, on its own full-cache view
    assert call["shape"] == tuple(cache.full.shape)


def test_writes_before_any_allocation_stay_vllm_ascends(boot) -> None:
    """Until a worker allocated the cache through the hook, the write hooks defer to vllm-ascend."""
    standin = boot("A5")
    assert hook.state.config is None
    layer = standin.indexer.AscendDeepseekV4IndexerCache(D, torch.bfloat16)
    spec = standin.indexer.AscendMLAAttentionSpec(16, 1, D, torch.float8_e4m3fn, 1, torch.float32)
    cache = carve_packed(spec, 2)
    standin.device_op.DeviceOperator.indexer_quant_scatter_part1(
        torch.randn(3, D, dtype=torch.bfloat16), cache.values, cache.full, torch.arange(3, dtype=torch.int32))
    assert standin.v2_calls[0]["shape"] == tuple(cache.full.shape)
    del layer
