"""The plugin's DeepSeek-V4 indexer cache on vLLM's CPU platform (integrations/dsv4_indexer_cpu/), against
vLLM 0.32.x's own classes: page views in a shared pool, the write, the reader, the allocation spec and vLLM's
block accounting, and the write hook against vLLM's own write path (the shadow check)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vllm_indexer_epilog.integrations.dsv4_indexer_cpu.rows import compress_indexer_rows  # noqa: E402
from vllm_indexer_epilog.integrations.config import EpilogConfig  # noqa: E402
from vllm_indexer_epilog.integrations.dsv4_indexer_cpu import indexer_cache as ic  # noqa: E402
from vllm_indexer_epilog.integrations.dsv4_indexer_cpu.indexer_layout import (  # noqa: E402
    HEAD_DIM, VLLM_LAYOUT, IndexerLayout, page_views, paged_mqa_logits, read_rows, scales_as_float32, write_rows,
)
from vllm_indexer_epilog.integrations.patching import Patcher, install_modules  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat import ops_attention, ops_compressor  # noqa: E402
from vllm_indexer_epilog.op.dequant import dequantize  # noqa: E402
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog  # noqa: E402
from vllm_indexer_epilog.op.spec import (  # noqa: E402
    QUANT_MODE_HIFLOAT8, QUANT_MODE_MX, QUANT_MODE_STANDARD, SCALE_DTYPE_BY_MODE,
)

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
LAYOUTS = {
    "standard-e4m3fn": IndexerLayout(E4, QUANT_MODE_STANDARD),
    "mx-round-e4m3fn": IndexerLayout(E4, QUANT_MODE_MX, True),
    "mx-floor-e4m3fn": IndexerLayout(E4, QUANT_MODE_MX, False),
    "standard-e5m2": IndexerLayout(E5, QUANT_MODE_STANDARD),
    "mx-round-e5m2": IndexerLayout(E5, QUANT_MODE_MX, True),
    "hifloat8": IndexerLayout(torch.uint8, QUANT_MODE_HIFLOAT8),  # the float32 scale slot is never written
}
BS = 64  # compressed rows per block (vLLM's block size 256 / compress ratio 4)
BLOCK_STRIDE = 46080  # bytes per block of the tiny config's pool (indexer page 8640 + attention page 37440)
PAGE = 8640


def pool(num_blocks: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool like vLLM's (random bytes everywhere) and the indexer's `[blocks, page]` view at offset 0."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (num_blocks * BLOCK_STRIDE,), dtype=torch.uint8, generator=g)
    return raw, raw.view(num_blocks, BLOCK_STRIDE)[:, :PAGE]


def rows(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-12, 8, (n, 1), generator=g).float())
    return (torch.randn(n, HEAD_DIM, generator=g) * mag).to(torch.bfloat16)


def slot_mapping(n: int, num_slots: int, seed: int = 2) -> torch.Tensor:
    """vLLM-like: int64, unique slots, about 3 in 4 entries -1 (tokens that close no compression window)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=g)[:n].to(torch.int64)
    slots[torch.rand(n, generator=g) < 0.75] = -1
    return slots


@pytest.mark.parametrize("name", LAYOUTS)
def test_write_lands_in_the_page_views_only(name: str) -> None:
    """Rows go to codes then scales of their block's page; every other byte of the shared pool is untouched."""
    layout = LAYOUTS[name]
    raw, kv2d = pool()
    before = raw.clone()
    x, slots = rows(200), slot_mapping(200, 6 * BS)
    values, scales = page_views(kv2d, BS, layout)
    assert values.data_ptr() == kv2d.data_ptr() and values.stride(0) == BLOCK_STRIDE
    write_rows(values, scales, x, slots, layout)

    want_c = torch.zeros(6 * BS, HEAD_DIM, dtype=layout.fp8_dtype)
    want_s = torch.zeros(6 * BS, 1, dtype=SCALE_DTYPE_BY_MODE[layout.quant_mode])
    reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=layout.quant_mode,
                                      round_scale=layout.round_scale)
    valid = slots[slots >= 0]
    codes, scale_bytes = read_rows(kv2d, BS, valid, layout)
    assert torch.equal(codes, want_c[valid].view(torch.uint8))
    if not layout.hifloat8:
        assert torch.equal(scale_bytes, want_s[valid].view(torch.uint8).reshape(valid.numel(), -1))
    # Everything but the written rows' code and scale bytes is as before (the page is shared).
    touched = torch.zeros_like(raw, dtype=torch.bool).view(6, BLOCK_STRIDE)
    blk, off = valid // BS, valid % BS
    touched[blk[:, None], off[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)] = True
    sb = layout.scale_bytes
    if not layout.hifloat8:  # HiFloat8 writes codes only
        touched[blk[:, None], BS * HEAD_DIM + off[:, None] * sb + torch.arange(sb)] = True
    assert torch.equal(raw[~touched.view(-1)], before[~touched.view(-1)])


def test_slot_mapping_goes_to_the_writer_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's int64 slot mapping reaches the write unchanged (same tensor: no copy, no cast)."""
    seen = []
    import vllm_indexer_epilog.integrations.dsv4_indexer_cpu.indexer_layout as lay

    real = lay.indexer_compress_epilog
    monkeypatch.setattr(lay, "indexer_compress_epilog", lambda *a, **k: (seen.append(a[3]), real(*a, **k)))
    _, kv2d = pool()
    slots = slot_mapping(50, 6 * BS)
    write_rows(*page_views(kv2d, BS, LAYOUTS["mx-round-e4m3fn"]), rows(50), slots, LAYOUTS["mx-round-e4m3fn"])
    assert seen[0] is slots


def _pages_with_rows(layout: IndexerLayout, seed: int, num_blocks: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    _, kv2d = pool(num_blocks, seed)
    x = rows(num_blocks * BS, seed)
    slots = torch.arange(num_blocks * BS)
    if layout == VLLM_LAYOUT and seed % 2:  # vLLM's own writer (compat op), power-of-two float32 scales
        q, s = ops_compressor.quantize_indexer_rows(x)
        codes, scales = page_views(kv2d, BS, layout)
        codes.view(torch.uint8).view(-1, BS * HEAD_DIM)[:] = q.view(num_blocks, -1)
        scales.view(-1, BS)[:] = s.view(num_blocks, BS)
    else:
        write_rows(*page_views(kv2d, BS, layout), x, slots, layout)
    return kv2d, x


def _queries(b: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, HEAD_DIM, generator=g) * 4).to(E4)
    w = torch.randn(b, h, generator=g)
    return q, w


@pytest.mark.parametrize("name", LAYOUTS)
def test_reader_decodes_every_layout(name: str) -> None:
    """logits = k_scale * sum_h w * relu(q . k) with the keys as the op wrote them (dequantize, float64)."""
    layout = LAYOUTS[name]
    kv2d, _ = _pages_with_rows(layout, 3)
    b, h = 5, 4
    q, w = _queries(b, h, 4)
    seq_lens = torch.tensor([0, 1, 63, 300, 512], dtype=torch.int32)
    table = torch.stack([torch.randperm(8)[:8] for _ in range(b)]).to(torch.int32)
    got = paged_mqa_logits(q, kv2d, w, seq_lens, table, BS, 512, layout)
    values, scales = page_views(kv2d, BS, layout)
    for i in range(b):
        n = int(seq_lens[i])
        t = torch.arange(n)
        slots = table[i].long()[t // BS] * BS + t % BS
        k_codes = values[slots // BS, slots % BS]
        k = layout.codes_to_float32(k_codes.view(torch.uint8)).double()
        s = scales_as_float32(read_rows(kv2d, BS, slots, layout)[1], layout).double()
        want = (torch.relu(k @ q[i].double().T) * w[i].double()).sum(-1) * s
        scale = float(want.abs().max()) if n else 1.0
        torch.testing.assert_close(got[i, :n].double(), want, rtol=1e-5, atol=1e-5 * scale)
        assert torch.isinf(got[i, n:]).all()
        if n:  # the keys the reader used are the op's own dequantization of those rows
            dq = dequantize(k_codes.contiguous(), scales[slots // BS, slots % BS].contiguous())
            torch.testing.assert_close(dq.double(), k * s[:, None])


def test_e8m0_scales_expand_exactly() -> None:
    b = torch.arange(1, 255, dtype=torch.uint8)
    got = scales_as_float32(b[:, None], LAYOUTS["mx-round-e4m3fn"])
    assert torch.equal(got, torch.exp2(b.double() - 127).float())


def test_reader_matches_vllm_reader_bit_for_bit() -> None:
    """Same bytes (vLLM's layout): ours and vLLM's (compat) reader give identical logits; MX-round rows hold the
    same codes and scale values as vLLM's writer, so their logits are identical too (identical top-k)."""
    kv_vllm, x = _pages_with_rows(VLLM_LAYOUT, 1)
    b, h = 6, 8
    q, w = _queries(b, h, 9)
    seq_lens = torch.tensor([5, 64, 65, 200, 400, 512])
    table = torch.stack([torch.randperm(8) for _ in range(b)]).to(torch.int32)
    theirs = ops_attention.fp8_paged_mqa_logits_cpu(q, kv_vllm, w, seq_lens, table, BS, 512)
    ours = paged_mqa_logits(q, kv_vllm, w, seq_lens, table, BS, 512, VLLM_LAYOUT)
    assert torch.equal(theirs, ours)
    mx = LAYOUTS["mx-round-e4m3fn"]
    _, kv_mx = pool(8, 1)
    write_rows(*page_views(kv_mx, BS, mx), x, torch.arange(8 * BS), mx)
    assert torch.equal(paged_mqa_logits(q, kv_mx, w, seq_lens, table, BS, 512, mx), theirs)


# ------------------------------------------------------------------------------------------- hooks
@pytest.fixture
def hooked():
    """The three sites hooked on vLLM's real modules, undone afterwards."""
    import vllm._custom_ops as ops
    from vllm.models.deepseek_v4.cpu import cpu_compressor, cpu_sparse

    patcher = Patcher()
    assert {cpu_sparse.__name__, cpu_compressor.__name__, ops.__name__} == set(ic._present(ic.MODULE_PATCHES))
    lines = install_modules(patcher, "indexer_cache", ic._present(ic.MODULE_PATCHES))
    assert len(lines) == 3 and all("hooked" in line for line in lines), lines
    patcher.own(ic.state, "flag", None)
    patcher.own(ic.state, "layout", None)
    yield SimpleNamespace(ops=ops, compressor=cpu_compressor, sparse=cpu_sparse)
    patcher.undo()


CONFIGS = {
    "standard-e4m3fn": EpilogConfig(quant_mode=QUANT_MODE_STANDARD, explicit=True),
    "mx-round-e4m3fn": EpilogConfig(quant_mode=QUANT_MODE_MX, round_scale=True, explicit=True),
    "mx-floor-e4m3fn": EpilogConfig(quant_mode=QUANT_MODE_MX, round_scale=False, explicit=True),
    "standard-e5m2": EpilogConfig(quant_mode=QUANT_MODE_STANDARD, fp8_dtype=E5, explicit=True),
    "hifloat8": EpilogConfig(quant_mode=QUANT_MODE_HIFLOAT8, explicit=True),
    "off": EpilogConfig(enabled=False, explicit=True),
}


def _tiny_specs(index_spec):  # noqa: ANN001, ANN202
    """The tiny config's KV cache specs as vLLM 0.32.0 builds them, with `index_spec` for the indexer cache."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec

    common = dict(num_kv_heads=1, max_tp_shards=1, alignment=576)
    swa = SlidingWindowMLASpec(block_size=64, head_size=512, dtype=torch.uint8, sliding_window=128,
                               state_content_bytes=584, cache_dtype_str="fp8_ds_mla", model_version="deepseek_v4",
                               kv_quant_mode=index_spec.kv_quant_mode.__class__(1), **common)
    return {
        "model.layers.0.attn.indexer.k_cache": index_spec,
        "model.layers.0.attn.indexer.compressor.state_cache": SlidingWindowMLASpec(
            block_size=4, head_size=512, dtype=torch.float32, sliding_window=8, **common),
        "model.layers.0.attn.swa_cache": swa,
        "model.layers.0.attn": MLAAttentionSpec(
            block_size=256, head_size=512, dtype=torch.uint8, tokens_per_state=4, state_content_bytes=584,
            cache_dtype_str="fp8_ds_mla", model_version="deepseek_v4", kv_quant_mode=swa.kv_quant_mode, **common),
        "model.layers.0.attn.compressor.state_cache": SlidingWindowMLASpec(
            block_size=4, head_size=2048, dtype=torch.float32, sliding_window=8, **common),
        "model.layers.1.attn.swa_cache": swa,
    }


def _kv_cache_config(specs):  # noqa: ANN001, ANN202
    from pathlib import Path

    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.utils import record_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    model = Path(__file__).resolve().parents[3] / "configs" / "dsv4-tiny"
    cfg = EngineArgs(model=str(model), load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
                     max_model_len=4096, block_size=256).create_engine_config()
    with set_current_vllm_config(cfg):
        record_kv_cache_layout(cfg.cache_config, "BLHNC")
        return get_kv_cache_configs(cfg, [specs], [1 << 30])[0]


def test_allocation_per_mode_keeps_vllm_block_accounting(hooked) -> None:  # noqa: ANN001
    """head_size = the mode's row bytes; the 576 B alignment of DeepSeek-V4's pages pads every mode's page to
    vLLM's 8640 B, so the pool's block stride and block count are vLLM's own in every mode."""
    layer = SimpleNamespace(cache_config=SimpleNamespace(block_size=256), head_dim=132, dtype=torch.uint8,
                            compress_ratio=4)
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="fp8_ds_mla"))
    base = hooked.sparse.DeepseekV4IndexerCache.get_kv_cache_spec(layer, vllm_config)
    assert (base.head_size, base.page_size_bytes) == (132, PAGE)
    vllm_kcc = _kv_cache_config(_tiny_specs(base))
    want_bytes = {"standard-e4m3fn": 132, "mx-round-e4m3fn": 129, "mx-floor-e4m3fn": 129, "standard-e5m2": 132,
                  "hifloat8": 132, "off": 132}
    for name, config in CONFIGS.items():
        ic.activate(config)
        spec = hooked.sparse.DeepseekV4CPUIndexerCache.get_kv_cache_spec(layer, vllm_config)
        assert spec.head_size == want_bytes[name]
        assert spec.real_page_size_bytes == BS * want_bytes[name]  # what the layout needs
        assert spec.page_size_bytes == PAGE  # padded by vLLM's alignment rule
        kcc = _kv_cache_config(_tiny_specs(spec))
        assert kcc.num_blocks == vllm_kcc.num_blocks
        tensors = {t.layers[0]: t for t in kcc.kv_cache_tensors}
        index = tensors["model.layers.0.attn.indexer.k_cache"]
        assert (index.block_stride, index.layer_stride, index.offset) == (BLOCK_STRIDE, PAGE, 0)
        assert [t.size for t in kcc.kv_cache_tensors] == [t.size for t in vllm_kcc.kv_cache_tensors]


def _compressor_inputs(n_tokens: int = 40, seed: int = 0):  # noqa: ANN202
    """Inputs of compress_norm_rope_store_indexer_cpu as DeepseekV4CPUCompressor.forward builds them."""
    g = torch.Generator().manual_seed(seed)
    ratio, window, state_bs = 4, 8, 4
    positions = torch.arange(n_tokens, dtype=torch.int64) + 3
    state_cache = torch.randn(64, state_bs, 2 * 2 * HEAD_DIM, generator=g) * 3
    gather = (positions[:, None] - window + 1 + torch.arange(window)).clamp(min=-1)
    gather = torch.where(gather >= 0, gather % (64 * state_bs), -1)
    kv_slots = torch.where((positions + 1) % ratio == 0, positions // ratio + 70, -1)
    norm_w = torch.rand(HEAD_DIM, generator=g) + 0.5
    cos_sin = torch.randn(8192, 64, generator=g)
    return (state_cache, gather, positions, kv_slots, norm_w, 1e-6, cos_sin), ratio


@pytest.mark.parametrize("name", CONFIGS)
def test_write_hook_matches_reference_and_vllm(hooked, name: str) -> None:  # noqa: ANN001
    """The hooked store writes the op's reference of compress_indexer_rows' rows at vLLM's slots; in MX
    round_scale=true / e4m3fn its codes and scale values equal vLLM's own write path (the shadow check); with
    the flag disabled vLLM's own store runs."""
    config = CONFIGS[name]
    ic.activate(config)
    layout = IndexerLayout.of(config) if config.enabled else VLLM_LAYOUT
    args, ratio = _compressor_inputs()
    _, kv2d = pool(4)
    hooked.compressor.compress_norm_rope_store_indexer_cpu(*args, kv2d, BS, ratio)
    kv_vllm = pool(4)[1]
    ops_compressor.compress_norm_rope_store_indexer(*args, kv_vllm, BS, ratio)
    comp = compress_indexer_rows(*args[:4], *args[4:7], ratio)
    slots = comp.kv_slots
    assert slots.numel() == int((args[3] >= 0).sum()) > 0
    codes, scale_bytes = read_rows(kv2d, BS, slots, layout)
    vcodes, vscale = read_rows(kv_vllm, BS, slots, VLLM_LAYOUT)
    if not config.enabled:
        assert torch.equal(codes, vcodes) and torch.equal(scale_bytes, vscale)
        return
    want_c = torch.zeros(slots.numel(), HEAD_DIM, dtype=layout.fp8_dtype)
    want_s = torch.zeros(slots.numel(), 1, dtype=layout.scale_dtype)
    reference_indexer_compress_epilog(want_c, want_s, comp.rows, torch.arange(slots.numel()),
                                      quant_mode=layout.quant_mode, round_scale=layout.round_scale)
    assert torch.equal(codes, want_c.view(torch.uint8))
    if layout.hifloat8:  # the scale slots keep the pool's bytes
        assert torch.equal(scale_bytes, read_rows(pool(4)[1], BS, slots, layout)[1])
    else:
        assert torch.equal(scale_bytes, want_s.view(torch.uint8).view(slots.numel(), -1))
    if name == "mx-round-e4m3fn":
        assert torch.equal(codes, vcodes)
        assert torch.equal(scales_as_float32(scale_bytes, layout), scales_as_float32(vscale, VLLM_LAYOUT))


@pytest.mark.parametrize("name", CONFIGS)
def test_read_hook_runs_the_right_reader(hooked, name: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Standard e4m3fn and flag off: vLLM's reader runs (its wrapper, then `torch.ops._C`'s kernel) and its
    result comes back as is; otherwise the plugin's reader runs and vLLM's kernel is not called. Spies on both,
    whichever kernel this host's `_C` has: vLLM's C++ (AVX512-BF16) or, elsewhere, the compat layer's op."""
    config = CONFIGS[name]
    ic.activate(config)
    layout = IndexerLayout.of(config) if config.enabled else VLLM_LAYOUT
    vllm_reader = name in ("standard-e4m3fn", "off")
    assert ic.state.layout is None or ic.state.layout.vllm_reader_fits == vllm_reader
    kv2d, _ = _pages_with_rows(layout, 5)
    q, w = _queries(3, 4, 1)
    seq_lens, table = torch.tensor([10, 200, 512]), torch.stack([torch.randperm(8) for _ in range(3)])

    # vLLM's C++ kernel where its library has it (AVX512-BF16 hosts), else the op the compat layer defines.
    real_cpp = hasattr(torch.ops._C, "fp8_paged_mqa_logits_cpu")
    kernel = torch.ops._C.fp8_paged_mqa_logits_cpu if real_cpp else ops_attention.fp8_paged_mqa_logits_cpu
    kernel_calls: list[tuple] = []
    plugin_calls: list[tuple] = []

    def kernel_spy(*args):  # noqa: ANN002, ANN202
        kernel_calls.append(args)
        out = kernel(*args)
        kernel_calls[-1] = (*args, out)
        return out

    def plugin_spy(*args):  # noqa: ANN002, ANN202
        plugin_calls.append(args)
        return paged_mqa_logits(*args)

    monkeypatch.setattr(torch.ops._C, "fp8_paged_mqa_logits_cpu", kernel_spy, raising=False)
    monkeypatch.setattr(ic, "paged_mqa_logits", plugin_spy)
    got = hooked.ops.fp8_paged_mqa_logits_cpu(q, kv2d, w, seq_lens, table, BS, 512)
    want = paged_mqa_logits(q, kv2d, w, seq_lens, table, BS, 512, layout)  # the plugin's scorer, any layout
    if not vllm_reader:
        assert len(plugin_calls) == 1 and plugin_calls[0][-1] is ic.state.layout and kernel_calls == []
        assert torch.equal(got, want)  # -inf beyond seq_len included
        return
    assert plugin_calls == [] and len(kernel_calls) == 1
    *args, out = kernel_calls[0]
    assert got is out and args[1] is kv2d and args[3] is seq_lens and args[6] == 512  # vLLM's call, unchanged
    # The same logits as the plugin's scorer reading vLLM's layout, where they are defined (t < seq_len: vLLM's
    # C++ leaves the rest uninitialised, and both top-k consumers (vLLM's topk_transform_512_cpu and the compat
    # op) read only t < seq_len, checked in test_topk_consumers_read_only_t_below_seq_len). The compat op is
    # the plugin's scorer: identical. vLLM's C++ sums the 128-term dot products and the heads in another order:
    # float32 rounding only, a few ulps of the largest partial sum (measured over 5 seeds: at most 5e-8 of the
    # largest logit, up to 1e-4 relative where a logit nearly cancels). Hence rtol 1e-5 plus an atol of 2**-20
    # (about 8 float32 ulps) of the largest logit.
    valid = torch.arange(512)[None] < seq_lens[:, None]
    if real_cpp:
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=want[valid].abs().max().item() * 2**-20)
    else:
        assert torch.equal(got, want)


def test_read_hook_captures_the_query_side(hooked, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """With the capture switch on, each scoring call saves a "read" record (benchmarks/quality_per_mode.py rescores
    from it): the FP8 query bytes and dtype, weights, seq_lens, page table, block size, length, which reader ran;
    decoding the bytes gives back the queries."""
    from vllm_indexer_epilog.integrations.dsv4_indexer_cpu import indexer_debug
    from vllm_indexer_epilog.integrations.dsv4_indexer_cpu.scoring import fp8_to_float32

    monkeypatch.setenv("VLLM_INDEXER_EPILOG_CAPTURE_DIR", str(tmp_path))
    indexer_debug.reset()
    try:
        ic.activate(CONFIGS["mx-round-e4m3fn"])
        kv2d, _ = _pages_with_rows(ic.state.layout, 5)
        q, w = _queries(3, 4, 1)
        seq_lens, table = torch.tensor([10, 200, 512]), torch.stack([torch.randperm(8) for _ in range(3)])
        hooked.ops.fp8_paged_mqa_logits_cpu(q, kv2d, w, seq_lens, table, BS, 512)
    finally:
        monkeypatch.delenv("VLLM_INDEXER_EPILOG_CAPTURE_DIR")
        indexer_debug.reset()
    (path,) = tmp_path.glob("capture-*.pt")
    rec = torch.load(path, weights_only=False)
    assert rec["kind"] == "read" and rec["reader"] == "plugin" and rec["q_dtype"] == str(q.dtype)
    assert torch.equal(fp8_to_float32(rec["q"], q.dtype), q.float()) and torch.equal(rec["weight"], w.float())
    assert torch.equal(rec["seq_lens"], seq_lens) and torch.equal(rec["page_table"], table)
    assert rec["block_size"] == BS and rec["max_seq_len"] == 512


@pytest.mark.parametrize("real", [False, True], ids=["compat", "vllm-cpp"])
def test_topk_consumers_read_only_t_below_seq_len(real: bool) -> None:
    """The read's consumer masks by seq_len itself: logits beyond seq_len (-inf from the plugin's and compat
    readers, uninitialised memory from vLLM's C++ reader) cannot change the top-k selection. So no part of the
    plugin needs the reader's -inf tail."""
    if real:
        if not torch.cpu._is_avx512_bf16_supported():
            pytest.skip("vLLM's own kernels need an AVX512-BF16 host")
        import vllm._custom_ops  # noqa: F401

        if not hasattr(torch.ops._C, "topk_transform_512_cpu"):
            pytest.skip("vLLM's _C library does not define topk_transform_512_cpu on this host")
        topk = torch.ops._C.topk_transform_512_cpu
    else:
        topk = ops_attention.topk_transform_512_cpu
    g = torch.Generator().manual_seed(3)
    seq = torch.tensor([600, 1500, 10, 900], dtype=torch.int32)
    logits = torch.randn(4, 1500, generator=g)
    beyond = torch.arange(1500)[None] >= seq[:, None]
    tails = (logits.masked_fill(beyond, float("-inf")), logits.masked_fill(beyond, 1e30),
             logits.masked_fill(beyond, float("nan")))
    table = torch.arange(32, dtype=torch.int32).view(4, 8)
    picked = []
    for x in tails:
        pages, raw = torch.empty(4, 512, dtype=torch.int32), torch.empty(4, 512, dtype=torch.int32)
        topk(x, seq, table, pages, 256, raw)
        picked.append(([sorted(r) for r in pages.tolist()], [sorted(r) for r in raw.tolist()]))
    assert picked[0] == picked[1] == picked[2]
    assert all(0 <= i < 10 for i in picked[0][1][2] if i >= 0) and picked[0][1][2].count(-1) == 502
