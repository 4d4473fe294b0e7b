"""The NPU backend `triton` (issue 17) on the stand-in NPU layer: the Triton kernel, launched by npu.py's launch
code, runs under Triton's interpreter as the NPU kernel (CPU tensors stand in for NPU tensors; nothing here ran
on an NPU). Every mode, e4m3fn/e5m2, int32/int64 slots, contiguous caches and the packed-block pair; MX by
default; no host sync on the call path; and the vllm-ascend DeepSeek-V4 hook's MX writes going straight into
the packed pages (float32 2^e scale slots) with no temporary and no widening pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakes.ascend_standin import carve_packed, expected_packed, vllm_config
from helpers import MODES, as_bytes, poisoned, random_x
from vllm_indexer_epilog import envs
from vllm_indexer_epilog.backends import npu as npu_backend
from vllm_indexer_epilog.backends.npu import NpuBackend, write_packed, write_split
from vllm_indexer_epilog.op.dequant import mx_scales_to_float32
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

pytestmark = pytest.mark.skipif(
    npu_backend.why_not_triton(torch.device("cpu")) is not None,
    reason=f"the Triton kernel cannot run on the stand-in: {npu_backend.why_not_triton(torch.device('cpu'))}",
)


class NoHostSync:
    """Makes every host read of a tensor's value raise, except inside the kernel launch itself (the
    interpreter, standing in for the device, reads its inputs on the host by nature). Records launches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from vllm_indexer_epilog.backends import triton_kernel

        self.launches: list[dict] = []
        self.active = True
        guard = self

        def refuse(name):
            original = getattr(torch.Tensor, name)

            def method(t, *args, **kwargs):
                if guard.active:
                    raise AssertionError(f"host sync on the call path: Tensor.{name}")
                return original(t, *args, **kwargs)

            return method

        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, refuse(name))
        kernel = triton_kernel.epilog_kernel

        class Spy:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    guard.launches.append({"args": args, **kwargs})
                    guard.active = False
                    try:
                        kernel[grid](*args, **kwargs)
                    finally:
                        guard.active = True

                return run

        monkeypatch.setattr(triton_kernel, "epilog_kernel", Spy())


def _slots(t: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    s = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:t].to(dtype)
    s[::3] = -1
    return s


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_split_writes(boot, monkeypatch, mode, cache_dtype, slot_dtype) -> None:
    """Contiguous caches: MX goes to triton in auto; standard mode when named (its compiled op, custom_ops,
    is not installed here, so auto takes triton for it too)."""
    boot("A5")
    quant_mode, round_scale = mode
    seed = hash((mode.name, str(cache_dtype), str(slot_dtype))) % 2**31
    x = random_x(20, 300, torch.bfloat16, seed, specials=4)
    slots = _slots(20, 32, slot_dtype, seed)
    cache, scale = poisoned(32, 300, cache_dtype, quant_mode, seed)
    want_c, want_s = cache.clone(), scale.clone()
    reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    guard = NoHostSync(monkeypatch)
    assert write_split(cache, scale, x, slots, quant_mode=quant_mode, round_scale=round_scale) is NpuBackend.TRITON
    assert len(guard.launches) == 1
    guard.active = False
    np.testing.assert_array_equal(as_bytes(cache), as_bytes(want_c))
    np.testing.assert_array_equal(as_bytes(scale), as_bytes(want_s))


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_packed_writes(boot, monkeypatch, mode, x_dtype, slot_dtype) -> None:
    """The packed-block pair (vllm-ascend's A5 page), pages padded: MX in auto, standard when named (auto keeps
    vllm-ascend's v2 for standard mode where it fits, docs/ascend-triton.md says why)."""
    standin = boot("A5")
    quant_mode, round_scale = mode
    scale_dtype = torch.float32 if quant_mode == 1 else torch.float8_e8m0fnu
    spec = standin.indexer.AscendMLAAttentionSpec(16, 1, 128, torch.float8_e4m3fn, 1, scale_dtype)
    cache = carve_packed(spec, 3, pad=48, seed=1)
    x = random_x(30, 128, x_dtype, 2, specials=5)
    slots = _slots(30, 48, slot_dtype, 3)
    want = expected_packed(cache, x, slots, quant_mode, round_scale)
    if quant_mode == 1:
        monkeypatch.setenv(envs.NPU_BACKEND, "triton")
    guard = NoHostSync(monkeypatch)
    got = write_packed(cache.values, cache.scales, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    guard.active = False
    assert got is NpuBackend.TRITON and len(guard.launches) == 1 and standin.v2_calls == []
    assert torch.equal(cache.raw, want)


def test_standard_mode_keeps_v2_in_auto(boot) -> None:
    standin = boot("A5")
    spec = standin.indexer.AscendMLAAttentionSpec(16, 1, 128, torch.float8_e4m3fn, 1, torch.float32)
    cache = carve_packed(spec, 2)
    x, slots = random_x(8, 128, torch.bfloat16, 0), _slots(8, 32, torch.int64, 0)
    assert write_packed(cache.values, cache.scales, x, slots) is NpuBackend.C_ASCEND_V2


def test_forced_triton_where_it_cannot_launch_is_an_error(boot, monkeypatch) -> None:
    boot("A5")
    monkeypatch.setenv(envs.NPU_BACKEND, "triton")
    monkeypatch.setattr(npu_backend, "why_not_triton", lambda device: "no triton-ascend")
    cache, scale = poisoned(8, 128, torch.float8_e4m3fn, 0, 0)
    before = as_bytes(cache).copy()
    with pytest.raises(RuntimeError, match="triton but no triton-ascend"):
        write_split(cache, scale, random_x(2, 128, torch.bfloat16, 0), torch.tensor([0, 1]), quant_mode=0)
    np.testing.assert_array_equal(as_bytes(cache), before)


def test_npu_tensors_need_triton_ascend_for_ascend_950() -> None:
    """Under the interpreter no NPU target exists: NPU tensors are refused (auto falls back), never launched."""
    why = npu_backend._probe_triton("npu")
    assert why is not None and "interpreter" in why


@pytest.mark.parametrize("round_scale", [True, False])
@pytest.mark.parametrize("entry", ["serial", "split_stream"])
def test_deepseek_v4_hook_writes_mx_straight_into_the_pages(boot, monkeypatch, entry, round_scale) -> None:
    """Item 3: the hook's MX write (vllm-ascend's own call sites, patched) is one kernel launch on the page's two
    views, codes and float32 2^e scales, with no temporary and no widening pass (the split-cache detour is
    made to fail), and the bytes are the SPEC's."""
    standin = boot("A5")
    flag = {"quant_mode": "mx", "round_scale": round_scale}
    layer = standin.indexer.AscendDeepseekV4IndexerCache(128, torch.bfloat16, "model.layers.0.attn.indexer.k_cache")
    spec = layer.get_kv_cache_spec(vllm_config(flag, block_size=16))
    assert spec.scale_dtype == torch.float32
    cache = carve_packed(spec, 4, pad=32, seed=7)
    x = random_x(40, 128, torch.bfloat16, 8, specials=6)
    slots = _slots(40, 64, torch.int64, 9)
    want_v = cache.values.reshape(64, 128).clone()
    e8 = torch.zeros(64, 1, dtype=torch.float8_e8m0fnu)
    reference_indexer_compress_epilog(want_v, e8, x, slots, quant_mode=0, round_scale=round_scale)

    def detour(*args, **kwargs):
        raise AssertionError("MX went through the temporary + widening path")

    monkeypatch.setattr(npu_backend, "_write_packed_mx_as_float32_via_split", detour)
    guard = NoHostSync(monkeypatch)
    ops = standin.indexer.AscendIndexerOps()
    if entry == "serial":
        ops.quantize_update_cache_and_select_topk(torch.randn(4, 128, dtype=torch.bfloat16), x, cache.values,
                                                  cache.scales, cache.full, slots)
    else:
        ops.split_stream_update(x, cache.values, cache.scales, cache.full, slots)
    guard.active = False
    (launch,) = guard.launches
    assert launch["MX_F32_SCALE"] is True and launch["PACKED"] is True
    assert launch["MODE"] == (1 if round_scale else 2)
    # The kernel wrote into the page itself: its cache/scale arguments are views of the page buffer.
    assert launch["args"][2].data_ptr() == cache.raw.data_ptr()
    assert launch["args"][3].untyped_storage().data_ptr() == cache.raw.untyped_storage().data_ptr()
    assert standin.v2_calls == []
    written = slots[slots >= 0].long()
    assert torch.equal(cache.scales.reshape(64)[written], mx_scales_to_float32(e8[written]).reshape(-1))
    assert torch.equal(as_bytes_rows(cache.values, written), as_bytes_rows(want_v.view(4, 16, 1, 128), written))


def as_bytes_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, values.shape[-1])[rows].contiguous().view(torch.uint8)


def test_the_sync_guard_is_live(boot, monkeypatch) -> None:
    """Strict mode checks slots on the host by design: the guard above must catch that."""
    boot("A5")
    monkeypatch.setenv(envs.STRICT, "1")
    cache, scale = poisoned(8, 128, torch.float8_e4m3fn, 0, 0)
    x, slots = random_x(2, 128, torch.bfloat16, 0), torch.tensor([0, 1])
    NoHostSync(monkeypatch)
    with pytest.raises(AssertionError, match="host sync"):
        write_split(cache, scale, x, slots, quant_mode=0)
