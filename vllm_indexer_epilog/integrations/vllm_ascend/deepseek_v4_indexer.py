"""Hook: DeepSeek-V4's indexer cache on vllm-ascend -- allocation, write and reader, one flag.

Site (vllm-ascend 0.23.0 through 0.30.0rc2, each release run for real on CPU by
tests/integrations/vllm_ascend_real, and main of 2026-08-22):
- allocation: `AscendDeepseekV4IndexerCache.get_kv_cache_spec(vllm_config)` (in `models/deepseek_v4.py` up to
  0.26.0rc1, `models/deepseek_v4/indexer.py` from 0.27.1rc1 and on main)
  returns an `AscendMLAAttentionSpec` whose `dtype`/`scale_dtype` the model runner uses to size pages
  (`page_size_bytes` counts both) and to carve each page into values, scales and the whole-block view.
  On A5 that is e4m3fn + float32, and the hook keeps it so in both modes: MX stores each row's e8m0 scale
  widened to the float32 2^e it stands for (exact), so the page (8448 B at block size 64), the dtypes and
  vLLM's KV-cache plan (the compressor state padded to share the indexer's tensor) are those of standard
  mode. An e8m0 page (8256 B) would make the planner re-pad the state and regroup the caches (issue #13).
- write: `device/device_op.py` `DeviceOperator.indexer_quant_scatter` (serial) and
  `.indexer_quant_scatter_part1` (split-stream; its part 3 is skipped because part 1 returns no scale).
  Both are looked up on the class at call time, so replacing them before the first forward takes effect.
  The compressor's rows go to backends/npu.py `write_packed` (standard: vllm-ascend's own compiled
  `_C_ascend.indexer_compress_epilog_v2` where it fits, else the reference on the two views) or, MX,
  `write_packed_mx_as_float32` (our Triton kernel straight into the page's codes and float32 scale slots
  where it can launch, i.e. triton-ascend on Ascend 950; the reference on contiguous rows, then put into the
  pages, only where it cannot), with vLLM's slot mapping as it comes. Standard mode calls `write_packed` directly
  rather than through the registered op (which takes packed pages too, docs/SPEC.md): what graph capture
  sees is v2, as without the plugin.
- reader: the lightning indexer reads float32 key scales through `prepare_dsa_indexer_key_scale`,
  unpatched: both modes leave float32 there.
- `warmup_indexer_quant_scatter` (v2 on a throwaway 1-row buffer) has no caller in any release and writes
  no cache: left alone.
The flag is read where vLLM hands the config over (get_kv_cache_spec, in every worker, before any forward).
A2/A3 keep this cache as int8 keys with float16 scales and have no FP8 reader: refused there.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import torch

from ..config import EpilogConfig, EpilogConfigError, epilog_config_from_vllm
from ...op.geometry import scales_after_values
from ...backends.npu import write_packed, write_packed_mx_as_float32
from ...op.spec import DSV4_INDEXER_HEAD_DIM, QUANT_MODE_MX, num_groups
from ..patching import Patcher, SiteMissing, import_site, log_once, refuse, require
from ..catalogue import PatchSite

NAME = "deepseek_v4_indexer"
WRITTEN_AGAINST = "vllm-ascend 0.23.0 through 0.30.0rc2 and main of 2026-08-22 (182b75ea84)"
CACHE_MODULES = ("vllm_ascend.models.deepseek_v4.indexer", "vllm_ascend.models.deepseek_v4")
"""Where AscendDeepseekV4IndexerCache lives: main split the model into a package; releases have one module."""
TRIGGERS = CACHE_MODULES
VERSIONS = ((0, 23), (0, 31))  # every release in it runs in tests/integrations/vllm_ascend_real
SITE = "vllm-ascend's DeepSeek-V4 indexer cache"
INDEXER_HEAD_DIM = DSV4_INDEXER_HEAD_DIM  # the only indexer cache with FP8 rows and a scale column (scale_dim=1)

_VERSIONS_TEXT = "vllm-ascend 0.23.0 up to (not incl.) {}.{}, and main of 2026-08-22".format(*VERSIONS[1])
_REMOVE_WHEN = ("vllm-ascend writes the DeepSeek-V4 indexer cache through custom.indexer_compress_epilog "
                "itself (or an op of the same contract) for the modes this flag selects")
_site = functools.partial(PatchSite, versions=_VERSIONS_TEXT, remove_when=_REMOVE_WHEN)  # one release range, one fix
PATCHES: tuple[PatchSite, ...] = (
    _site(
        target="vllm_ascend.models.deepseek_v4[.indexer].AscendDeepseekV4IndexerCache.get_kv_cache_spec",
        why="reads the indexer_epilog flag in every worker before the first forward and sets the cache's "
            "FP8 dtype from it; without it the flag is never seen and the cache keeps vllm-ascend's dtypes",
        how="class attribute replaced (Patcher.set); calls the original, then dataclasses.replace on its spec",
    ),
    _site(
        target="vllm_ascend.device.device_op.DeviceOperator.indexer_quant_scatter",
        why="vllm-ascend quantizes and scatters the indexer keys itself (standard mode only); the patch "
            "writes them with this package's op in the configured mode",
        how="staticmethod replaced on the class (looked up at call time); inactive layers call the original",
    ),
    _site(
        target="vllm_ascend.device.device_op.DeviceOperator.indexer_quant_scatter_part1",
        why="the split-stream variant of the same write; returning no scale makes vllm-ascend skip its part 3",
        how="staticmethod replaced on the class; inactive layers call the original",
    ),
)


SPEC_SITE, SCATTER_SITE, SCATTER_PART1_SITE = PATCHES


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
    if config.hifloat8:
        refuse(config, SITE, "no vllm-ascend site reads HiFloat8 indexer keys (the A5 lightning indexer reads "
               "float8_e4m3fn keys with float32 scales)")
        return None
    if config.fp8_dtype != torch.float8_e4m3fn:
        raise EpilogConfigError(
            f"indexer_epilog.fp8_dtype={config.fp8_dtype}: the A5 lightning indexer "
            "(npu_vllm_quant_lightning_indexer, key_quant_mode=0) reads float8_e4m3fn keys only"
        )
    state.config = config
    how = ("the package's NPU writer (Triton where it launches) into the standard layout's float32 scale slots"
           if config.quant_mode == QUANT_MODE_MX else
           "indexer_compress_epilog's packed-cache path (_C_ascend.indexer_compress_epilog_v2 where it fits)")
    log_once(f"{SITE}: written by {how} ({config.describe()}); read by vllm-ascend's lightning indexer "
             "as float8_e4m3fn keys with float32 scales")
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


def _a5_probe(utils: Any) -> Any:
    """() -> whether this is an A5: `utils.get_ascend_device_type` up to 0.26.0rc1; from 0.27.1rc1 the
    hardware profile's DSV4_COMPRESSED_CACHE capability, the test vllm-ascend itself uses for this cache."""
    if hasattr(utils, "get_ascend_device_type"):
        device_type, a5 = utils.get_ascend_device_type, require(require(utils, "AscendDeviceType"), "A5")
        return lambda: device_type() == a5
    profile = import_site("vllm_ascend.device.hardware_profile")
    current = require(profile, "get_current_hardware_profile")
    capability = require(require(profile, "HardwareCapability"), "DSV4_COMPRESSED_CACHE")
    return lambda: bool(current().supports(capability))


def _write(config: EpilogConfig, values: torch.Tensor, scales: torch.Tensor, kv: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    if config.quant_mode == QUANT_MODE_MX:
        write_packed_mx_as_float32(values, scales, kv, slot_mapping, round_scale=config.round_scale)
    else:
        write_packed(values, scales, kv, slot_mapping, quant_mode=config.quant_mode, round_scale=config.round_scale)


def install(patcher: Patcher) -> str:
    cache_cls = _find_cache_class()
    device_op = import_site("vllm_ascend.device.device_op")
    utils = import_site("vllm_ascend.utils")
    get_spec = require(cache_cls, "get_kv_cache_spec")
    op = require(device_op, "DeviceOperator")
    scatter, part1, _ = (
        require(op, name)
        for name in ("indexer_quant_scatter", "indexer_quant_scatter_part1", "prepare_dsa_indexer_key_scale")
    )
    quantize_query = require(op, "indexer_quantize_query")
    on_a5 = _a5_probe(utils)

    def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
        spec = get_spec(self, vllm_config)
        config = _activate(self, vllm_config, on_a5())
        if config is None:
            return spec
        return dataclasses.replace(spec, dtype=config.fp8_dtype, scale_dtype=torch.float32)

    def indexer_quant_scatter(q, kv, k_cache, scale_cache, full_cache, slot_mapping):  # noqa: ANN001, ANN202
        config = state.config
        if config is None:
            return scatter(q, kv, k_cache, scale_cache, full_cache, slot_mapping)
        q, q_scale = quantize_query(q)
        if kv is not None:
            _write(config, k_cache, scale_cache, kv, slot_mapping)
        return q, q_scale, kv, None

    def indexer_quant_scatter_part1(kv, k_cache, full_cache, slot_mapping):  # noqa: ANN001, ANN202
        config = state.config
        if config is None:
            return part1(kv, k_cache, full_cache, slot_mapping)
        if kv is None:
            return None, None
        _write(config, k_cache, scales_after_values(k_cache, num_groups(k_cache.shape[-1]), torch.float32), kv,
               slot_mapping)
        return kv, None  # no scale: vllm-ascend then skips its part 3 (the separate scale scatter)

    patcher.set(cache_cls, "get_kv_cache_spec", get_kv_cache_spec, SPEC_SITE)
    patcher.set(op, "indexer_quant_scatter", staticmethod(indexer_quant_scatter), SCATTER_SITE)
    patcher.set(op, "indexer_quant_scatter_part1", staticmethod(indexer_quant_scatter_part1), SCATTER_PART1_SITE)
    patcher.own(state, "config", None)  # undo() also forgets what this process activated
    return (f"hooked {cache_cls.__name__}.get_kv_cache_spec and {op.__name__}.indexer_quant_scatter[_part1]; "
            "active once a worker allocates the indexer cache")
