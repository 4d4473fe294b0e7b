"""Hook: DeepSeek-V4's indexer cache on vllm-ascend -- allocation, write and reader, one flag.

Site (vllm-ascend 0.23.0 and 0.24.0rc1 releases, and main of 2026-08-22):
- allocation: `AscendDeepseekV4IndexerCache.get_kv_cache_spec(vllm_config)` (in `models/deepseek_v4.py` in the
  releases, `models/deepseek_v4/indexer.py` on main)
  returns an `AscendMLAAttentionSpec` whose `dtype`/`scale_dtype` the model runner uses to size pages
  (`page_size_bytes` counts both) and to carve each page into values, scales and the whole-block view.
  On A5 that is e4m3fn + float32; the hook sets the scale dtype the mode needs (e8m0 for MX).
- write: `device/device_op.py` `DeviceOperator.indexer_quant_scatter` (serial) and
  `.indexer_quant_scatter_part1` (split-stream; its part 3 is skipped because part 1 returns no scale).
  Both are looked up on the class at call time, so replacing them before the first forward takes effect.
  The compressor's rows go to `npu_backend.write_packed` with vLLM's slot mapping as it comes.
- reader: `npu_vllm_quant_lightning_indexer` reads float32 key scales through
  `DeviceOperator.prepare_dsa_indexer_key_scale`; in MX mode the hook expands the e8m0 bytes to float32
  powers of two there (exact), so the indexer reads what the op wrote.
The flag is read where vLLM hands the config over (get_kv_cache_spec, in every worker, before any forward).
A2/A3 keep this cache as int8 keys with float16 scales and have no FP8 reader: refused there.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from ..config import EpilogConfig, EpilogConfigError, epilog_config_from_vllm
from ...op.dequant import mx_scales_to_float32
from ...op.geometry import scales_after_values
from ...backends.npu import write_packed
from ...op.spec import QUANT_MODE_MX, SCALE_DTYPE_BY_MODE, num_groups
from ..patching import Patcher, SiteMissing, import_site, log_once, refuse, require

NAME = "deepseek_v4_indexer"
WRITTEN_AGAINST = "vllm-ascend 0.23.0 / 0.24.0rc1 and main of 2026-08-22 (182b75ea84)"
CACHE_MODULES = ("vllm_ascend.models.deepseek_v4.indexer", "vllm_ascend.models.deepseek_v4")
"""Where AscendDeepseekV4IndexerCache lives: main split the model into a package; releases have one module."""
TRIGGERS = CACHE_MODULES
VERSIONS = ((0, 23), (0, 25))
SITE = "vllm-ascend's DeepSeek-V4 indexer cache"
INDEXER_HEAD_DIM = 128  # the only indexer cache with FP8 rows and a scale column (scale_dim=1)


class _State:
    config: EpilogConfig | None = None
    """Set by the allocation hook in this process; the write and reader hooks follow it."""


state = _State()


def _activate(layer: Any, vllm_config: Any, on_a5: bool) -> EpilogConfig | None:
    config = epilog_config_from_vllm(vllm_config)
    if not config.enabled:
        log_once(f"{SITE}: disabled by indexer_epilog.enabled=false")
        return None
    if getattr(layer, "head_dim", None) != INDEXER_HEAD_DIM:
        return None  # not the FP8 indexer cache (no scale column); nothing of ours
    if not on_a5:
        refuse(config, SITE, "Ascend A2/A3 keep it as int8 keys with float16 scales for the int8 lightning "
               "indexer; no NPU reader of FP8 indexer keys exists there")
        return None
    if config.fp8_dtype != torch.float8_e4m3fn:
        raise EpilogConfigError(
            f"indexer_epilog.fp8_dtype={config.fp8_dtype}: the A5 lightning indexer "
            "(npu_vllm_quant_lightning_indexer, key_quant_mode=0) reads float8_e4m3fn keys only"
        )
    state.config = config
    log_once(f"{SITE}: written by custom.indexer_compress_epilog ({config.describe()}); read by "
             "npu_vllm_quant_lightning_indexer" + (" via e8m0->float32 key scales" if config.quant_mode == QUANT_MODE_MX else ""))
    return config


def _find_cache_class() -> type:
    """From whichever candidate module vllm-ascend has imported (never importing one early)."""
    missing = []
    for name in CACHE_MODULES:
        module = sys.modules.get(name)
        if module is None:
            missing.append(f"{name} not imported")
            continue
        try:
            return require(module, "AscendDeepseekV4IndexerCache")
        except SiteMissing as exc:
            missing.append(str(exc))
    raise SiteMissing("; ".join(missing))


def install(patcher: Patcher) -> str:
    cache_cls = _find_cache_class()
    device_op = import_site("vllm_ascend.device.device_op")
    utils = import_site("vllm_ascend.utils")
    get_spec = require(cache_cls, "get_kv_cache_spec")
    op = require(device_op, "DeviceOperator")
    scatter, part1, key_scale = (
        require(op, name)
        for name in ("indexer_quant_scatter", "indexer_quant_scatter_part1", "prepare_dsa_indexer_key_scale")
    )
    quantize_query = require(op, "indexer_quantize_query")
    device_type, a5 = require(utils, "get_ascend_device_type"), require(require(utils, "AscendDeviceType"), "A5")

    def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
        spec = get_spec(self, vllm_config)
        config = _activate(self, vllm_config, device_type() == a5)
        if config is None:
            return spec
        return dataclasses.replace(spec, dtype=config.fp8_dtype, scale_dtype=SCALE_DTYPE_BY_MODE[config.quant_mode])

    def indexer_quant_scatter(q, kv, k_cache, scale_cache, full_cache, slot_mapping):  # noqa: ANN001, ANN202
        config = state.config
        if config is None:
            return scatter(q, kv, k_cache, scale_cache, full_cache, slot_mapping)
        q, q_scale = quantize_query(q)
        if kv is not None:
            write_packed(k_cache, scale_cache, kv, slot_mapping,
                         quant_mode=config.quant_mode, round_scale=config.round_scale)
        return q, q_scale, kv, None

    def indexer_quant_scatter_part1(kv, k_cache, full_cache, slot_mapping):  # noqa: ANN001, ANN202
        config = state.config
        if config is None:
            return part1(kv, k_cache, full_cache, slot_mapping)
        if kv is None:
            return None, None
        scales = scales_after_values(k_cache, num_groups(k_cache.shape[-1]), SCALE_DTYPE_BY_MODE[config.quant_mode])
        write_packed(k_cache, scales, kv, slot_mapping, quant_mode=config.quant_mode, round_scale=config.round_scale)
        return kv, None  # no scale: vllm-ascend then skips its part 3 (the separate scale scatter)

    def prepare_dsa_indexer_key_scale(scale_cache: torch.Tensor) -> torch.Tensor:
        config = state.config
        if config is None or config.quant_mode != QUANT_MODE_MX:
            return key_scale(scale_cache)
        return mx_scales_to_float32(scale_cache.squeeze(-2))

    patcher.set(cache_cls, "get_kv_cache_spec", get_kv_cache_spec)
    patcher.set(op, "indexer_quant_scatter", staticmethod(indexer_quant_scatter))
    patcher.set(op, "indexer_quant_scatter_part1", staticmethod(indexer_quant_scatter_part1))
    patcher.set(op, "prepare_dsa_indexer_key_scale", staticmethod(prepare_dsa_indexer_key_scale))
    patcher.set(state, "config", None)  # undo() also forgets what this process activated
    return (f"hooked {cache_cls.__name__}.get_kv_cache_spec and {op.__name__}.indexer_quant_scatter[_part1]"
            "/prepare_dsa_indexer_key_scale; active once a worker allocates the indexer cache")
