"""DeepSeek-V4's indexer cache through the plugin's hook, on the REAL vllm-ascend of one release (child
process; npu_standin.py boots it). Real: the site modules, the allocation (`get_kv_cache_spec`), the
AscendMLAAttentionSpec and its page size, the callers (`AscendIndexerOps` from 0.27.1rc1, the DSA impl's
`_indexer_quant_scatter` before), `DeviceOperator` and its A5 adaptor. Stand-ins: the NPU layer
(npu_standin.py), the layer object handed to `get_kv_cache_spec` (its attributes only: building the real
layer needs a running model), and the carving of pages into views, done here as the model runner does
(model_runner_v1 needs torchvision, which does not load against the CPU torch)."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import npu_standin
from vllm_indexer_epilog.backends import npu as npu_writer
from vllm_indexer_epilog.integrations.config import EpilogConfigError
from vllm_indexer_epilog.integrations.vllm_ascend import deepseek_v4_indexer as hook
from vllm_indexer_epilog.op.dequant import mx_scales_to_float32
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog
from vllm_indexer_epilog.op.spec import QUANT_MODE_MX, QUANT_MODE_STANDARD

D = 128
MODES = {"default": None, "standard": {"quant_mode": "standard"}, "mx": {"quant_mode": "mx"},
         "mx_ocp": {"quant_mode": "mx", "round_scale": False}}


def _cache_module():
    for name in hook.CACHE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "AscendDeepseekV4IndexerCache"):
            return module
    raise AssertionError(f"AscendDeepseekV4IndexerCache in none of {hook.CACHE_MODULES}")


CACHE = _cache_module()  # vllm-ascend's first import of it installs the hook
from vllm_ascend.device.device_op import DeviceOperator  # noqa: E402


class Ops(TorchDispatchMode):
    """Every torch op called inside, by name (what graph capture and torch.compile would see)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def vllm_config(flag):
    from vllm_ascend.models.layer.attention.layer import DSV4_BLOCK_SIZES

    hf = SimpleNamespace(**({} if flag is None else {"indexer_epilog": flag}))
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), additional_config={},
                           cache_config=SimpleNamespace(block_size=sorted(DSV4_BLOCK_SIZES)[0], cache_dtype="auto"))


def spec_for(flag):
    # The key dtype vllm-ascend gives this cache on A5: up to 0.26.0rc1 get_kv_cache_spec sets it itself;
    # later the model builds the layer with it (attention_config.indexer_kv_dtype, get_indexer_k_dtype).
    dtype = torch.float8_e4m3fn
    layer = SimpleNamespace(head_dim=D, dtype=dtype, compress_ratio=4,
                            cache_config=SimpleNamespace(cache_dtype="auto"), prefix="model.layers.0.attn.indexer")
    return CACHE.AscendDeepseekV4IndexerCache.get_kv_cache_spec(layer, vllm_config(flag))


class Pages(SimpleNamespace):
    pass


def carve(spec, num_blocks: int, seed: int) -> Pages:
    """Raw pages of spec.page_size_bytes random bytes, viewed as values / scales / whole rows."""
    page = spec.page_size_bytes
    row = D * spec.dtype.itemsize + spec.scale_dim * spec.scale_dtype.itemsize
    rows = page // row
    raw = torch.randint(0, 256, (num_blocks * page,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    values = torch.as_strided(raw.view(spec.dtype), (num_blocks, rows, 1, D), (page, D, D, 1))
    scales = torch.as_strided(raw.view(torch.float32), (num_blocks, rows, 1, 1), (page // 4, 1, 1, 1), rows * D // 4)
    full = torch.as_strided(raw.view(spec.dtype), (num_blocks, rows, 1, row), (page, row, row, 1))
    return Pages(raw=raw, values=values, scales=scales, full=full, rows=rows, page=page, nb=num_blocks)


def expected(p: Pages, x, slots, flag) -> torch.Tensor:
    mode = QUANT_MODE_MX if flag and flag.get("quant_mode") == "mx" else QUANT_MODE_STANDARD
    rs = (flag or {}).get("round_scale", True)
    n = p.nb * p.rows
    v = p.values.reshape(n, D).clone()
    s32 = p.scales.reshape(n, 1).clone()
    if mode == QUANT_MODE_MX:
        e = torch.zeros(n, 1, dtype=torch.float8_e8m0fnu)
        reference_indexer_compress_epilog(v, e, x, slots, quant_mode=mode, round_scale=rs)
        written = slots[slots >= 0].long()
        s32[written] = mx_scales_to_float32(e[written])
    else:
        reference_indexer_compress_epilog(v, s32, x, slots, quant_mode=mode, round_scale=rs)
    want = p.raw.clone().view(p.nb, p.page)
    want[:, : p.rows * D] = v.view(torch.uint8).view(p.nb, -1)
    want[:, p.rows * D: p.rows * (D + 4)] = s32.view(torch.uint8).view(p.nb, -1)
    return want.view(-1)


def write_case(mode: str, num_blocks: int, rows: int, seed: int):  # noqa: ANN201
    """(flag, pages, x, slots, the bytes the write must leave) for one mode: pages carved with `seed`, the batch
    drawn with `seed + 1`."""
    flag = MODES[mode]
    p = carve(spec_for(flag), num_blocks, seed=seed)
    x, slots = batch(p, rows, seed=seed + 1)
    return flag, p, x, slots, expected(p, x, slots, flag)


def batch(p: Pages, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, D, generator=g) * torch.exp2(torch.randint(-12, 12, (tokens, 1), generator=g).float()))
    slots = torch.randperm(p.nb * p.rows, generator=g)[:tokens]
    slots[::5] = -1
    return x.to(torch.bfloat16), slots


def serial_write(q, kv, p: Pages, slots):
    """The release's own serial caller of DeviceOperator.indexer_quant_scatter."""
    ops_cls = getattr(CACHE, "AscendIndexerOps", None)
    if ops_cls is not None:
        ops = ops_cls(2048)
        seen = {}

        def select_topk(query, weights, query_scale, key_cache, scale_cache, metadata):  # noqa: ANN001, ANN202
            seen["key_scale"] = ops.device_operator.prepare_dsa_indexer_key_scale(scale_cache)
            return query

        ops.select_topk = select_topk
        args = {"query": q, "key": kv, "weights": None, "key_cache": p.values, "scale_cache": p.scales,
                "full_cache": p.full, "slot_mapping": slots, "metadata": None}
        names = list(inspect.signature(ops.quantize_update_cache_and_select_topk).parameters)
        ops.quantize_update_cache_and_select_topk(**{n: args[n] for n in names})
        return seen["key_scale"]
    dsa = importlib.import_module("vllm_ascend.attention.dsa_v1")
    (impl,) = [c for c in vars(dsa).values() if inspect.isclass(c) and "_indexer_quant_scatter" in vars(c)]
    impl._indexer_quant_scatter(None, q, kv, p.values, p.scales, p.full, slots)
    return DeviceOperator.prepare_dsa_indexer_key_scale(p.scales)


def part1_write(kv, p: Pages, slots):
    """The split-stream caller: AscendIndexerOps from 0.27.1rc1; before, the DSA impl calls it inline."""
    ops_cls = getattr(CACHE, "AscendIndexerOps", None)
    if ops_cls is not None:
        return ops_cls(2048).quantize_key_and_update_cache(kv, p.values, p.full, slots)
    return DeviceOperator.indexer_quant_scatter_part1(kv, p.values, p.full, slots)


@pytest.fixture(autouse=True)
def fresh():
    npu_standin.V2_CALLS.clear()
    npu_standin.CALLS.clear()
    hook.state.config = None
    yield
    hook.state.config = None


def test_site_found_and_patched(log_lines) -> None:
    assert any(line.startswith("deepseek_v4_indexer: hooked") for line in log_lines()), log_lines()
    for name in ("indexer_quant_scatter", "indexer_quant_scatter_part1"):
        assert getattr(DeviceOperator, name).__module__ == hook.__name__, name
    assert CACHE.AscendDeepseekV4IndexerCache.get_kv_cache_spec.__module__ == hook.__name__


def test_page_layout_is_the_same_in_every_mode() -> None:
    """Gap 2: MX leaves the spec (and so vLLM's KV-cache plan) exactly as standard mode has it."""
    specs = {name: spec_for(flag) for name, flag in MODES.items()}
    base = specs["standard"]
    assert (base.dtype, base.scale_dtype, base.scale_dim, base.head_size) == (torch.float8_e4m3fn, torch.float32, 1, D)
    for name, spec in specs.items():
        assert spec == base and spec.page_size_bytes == base.page_size_bytes, name
    assert base.page_size_bytes % (D + 4) == 0
    off = spec_for({"enabled": False})
    assert off.page_size_bytes == base.page_size_bytes  # vllm-ascend's own A5 layout: the same page


@pytest.mark.parametrize("mode", sorted(MODES))
def test_serial_caller_writes_the_right_bytes(mode) -> None:
    flag, p, x, slots, want = write_case(mode, 4, 37, seed=1)
    # The NPU writer's lines leave the package's log-once set, so that this write logs its backend choice again
    # (the other lines stay: later checks read them).
    npu_writer._logged.difference_update({m for m in npu_writer._logged if m.startswith("NPU ")})
    with Ops() as ops:
        key_scale = serial_write(torch.randn(5, 2, D, dtype=torch.bfloat16), x, p, slots)
    assert torch.equal(p.raw, want)
    written = slots[slots >= 0]
    assert key_scale.dtype == torch.float32
    assert torch.equal(key_scale.reshape(-1)[written], p.scales.reshape(-1)[written])
    if flag and flag["quant_mode"] == "mx":
        # The package's NPU writer wrote the MX rows (it logged which of its backends ran), not vllm-ascend's
        # v2, and no `custom::` op ran: where cann-recipes' compiled op owns custom::indexer_compress_epilog, a
        # call to it would run its MX mode, which is not SPEC-exact (docs/ascend-kernel.md).
        assert npu_standin.V2_CALLS == []
        assert not [n for n in ops.names if n.startswith("custom.")], sorted(set(ops.names))
        used = [m.group(1) for m in map(re.compile(r"NPU [\w-]+-cache writes use (\w+)").match, npu_writer._logged)
                if m is not None]
        assert used and not {"c_ascend_v2", "custom_ops"} & set(used), sorted(npu_writer._logged)
        got = key_scale.reshape(-1)[written]
        assert torch.equal(got, torch.exp2(torch.log2(got).round()))  # powers of two
    else:
        (call,) = npu_standin.V2_CALLS
        assert call["shape"] == (p.nb, p.rows, 1, D + 4) and call["block_stride"] == p.page
        assert call["storage"] == p.raw.untyped_storage().data_ptr() and call["offset"] == 0
        assert call["x"].data_ptr() == x.data_ptr()
        assert call["slots"].dtype == torch.int32 and torch.equal(call["slots"].long(), slots)
        assert "_C_ascend.indexer_compress_epilog_v2" in ops.names
    # The query is still quantized by vllm-ascend's own call.
    assert [c["dst_type"] for n, c in npu_standin.CALLS if n == "npu_dynamic_quant"] == [torch.float8_e4m3fn]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_split_stream_caller_writes_the_right_bytes_and_skips_part3(mode) -> None:
    flag, p, x, slots, want = write_case(mode, 3, 29, seed=3)
    out = part1_write(x, p, slots.to(torch.int32))
    assert out[1] is None and out[0] is x
    assert torch.equal(p.raw, want)
    assert len(npu_standin.V2_CALLS) == (0 if flag and flag["quant_mode"] == "mx" else 1)
    assert part1_write(None, p, slots) == (None, None)


def test_out_of_range_slots_write_nothing_outside() -> None:
    flag = MODES["mx"]
    p = carve(spec_for(flag), 2, seed=5)
    x, slots = batch(p, 11, seed=6)
    bad = slots.clone()
    bad[1], bad[2] = p.nb * p.rows, -9
    guarded = torch.where((bad >= -1) & (bad < p.nb * p.rows), bad, -1)
    want = expected(p, x, guarded, flag)
    part1_write(x, p, bad)
    assert torch.equal(p.raw, want)


def test_before_any_allocation_the_writes_stay_vllm_ascends() -> None:
    p = carve(spec_for(None), 2, seed=7)
    hook.state.config = None
    part1_write(torch.randn(3, D, dtype=torch.bfloat16), p, torch.arange(3, dtype=torch.int32))
    (call,) = npu_standin.V2_CALLS
    assert call["shape"] == tuple(p.full.shape)  # vllm-ascend's own call on its own view


@pytest.mark.parametrize("flag", [{"fp8_dtype": "float8_e5m2"}, {"quant_mode": "int8"}])
def test_unservable_flags_fail_at_allocation(flag) -> None:
    with pytest.raises(EpilogConfigError):
        spec_for(flag)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_warmup_has_no_caller_and_touches_no_cache(mode) -> None:
    """Gap 3: A5DeviceAdaptor.warmup_indexer_quant_scatter runs v2 on a throwaway buffer, unhooked."""
    import vllm_ascend

    root = pathlib.Path(vllm_ascend.__file__).parent
    callers = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py")
               for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
               if re.search(r"warmup_indexer_quant_scatter\(", line) and not re.search(r"def warmup_indexer", line)]
    assert callers == [], callers
    flag = MODES[mode]
    p = carve(spec_for(flag), 2, seed=8)
    before = p.raw.clone()
    x = torch.randn(4, D, dtype=torch.bfloat16)
    DeviceOperator.warmup_indexer_quant_scatter(x, torch.arange(4, dtype=torch.int32))
    assert torch.equal(p.raw, before)
    (call,) = npu_standin.V2_CALLS
    assert call["shape"] == (1, 1, 1, D) and call["storage"] != p.raw.untyped_storage().data_ptr()
