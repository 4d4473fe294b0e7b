"""Hook: DeepSeek-V3.2's LI-C8 indexer-key write on vllm-ascend (`--additional-config '{"enable_sparse_li_c8": true}'`).

Site (vllm-ascend 0.23.0 and 0.24.0rc1 releases, and main of 2026-08-22), `attention/sfa_v1.py`, `AscendSFAImpl`:
- `indexer_select_pre_process` quantizes the indexer key inline with `torch_npu.npu_dynamic_quant`
  (per-row FP8 + float32 scale on A5), then `forward` scatters key and scale into two separate contiguous
  caches with two `torch_npu.npu_scatter_nd_update_` calls at `attn_metadata.slot_mapping`.
Inline code has no method to replace, so the hook replaces `sfa_v1`'s module name `torch_npu` with a
proxy that forwards everything except, for a layer this hook activated, those three calls:
the quantization returns the unquantized key and a placeholder scale, the key scatter is held back, and
the scale scatter -- the last of the three -- runs `custom.indexer_compress_epilog` once, fused, on
both caches, through the registered op (its NPU kernel is backends/npu.py `write_split`). Anything out of
that order raises instead of writing wrong bytes.

Activation happens in `AscendSFAImpl.__init__`, which has the vLLM config: only for LI-C8 layers on A5
(FP8 cache, float32 scales), standard mode with e4m3fn (the lightning indexer reads the float32 scale
column straight from the cache, so no NPU reader of e8m0 scales exists on this path: MX is refused),
and not with `c8_enable_reshape_optim` (that path writes through `store_kv_block`) or context parallel
(a subclass that gathers keys across ranks before writing, `AscendSFACPImpl._get_full_kv` in 0.23.0,
or a pcp/dcp group of more than one rank): refused in `__init__`, at start-up, never at the first write.
Releases: 0.23.0 hooked; 0.24.0rc1 has no LI-C8 cache; from 0.25.1rc1 the version guard keeps vllm-ascend's
path (not run for real against this hook: see docs/ascend.md).
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..config import EpilogConfig, epilog_config_from_vllm
from ...backends.npu import write_split
from ...op import schema as op_schema
from ...op.spec import QUANT_MODE_MX
from ..patching import Patcher, SiteMissing, import_site, log_once, refuse, require
from ..catalogue import PatchSite

NAME = "sfa_li_c8"
WRITTEN_AGAINST = "vllm-ascend 0.23.0 / 0.24.0rc1 and main of 2026-08-22 (182b75ea84)"
VERSIONS = ((0, 23), (0, 25))
SITE = "vllm-ascend's DeepSeek-V3.2 LI-C8 indexer cache"
ATTR = "_indexer_epilog"
TRIGGERS = ("vllm_ascend.attention.sfa_v1",)
LI_C8_MARKER = "self.enable_sparse_li_c8 ="
"""How AscendSFAImpl.__init__ turns the LI-C8 cache on; releases without it (0.24.0rc1) have no site."""

_VERSIONS_TEXT = "vllm-ascend 0.23.0 up to (not incl.) {}.{} where LI-C8 exists, and main of 2026-08-22".format(*VERSIONS[1])
_REMOVE_WHEN = ("AscendSFAImpl writes the LI-C8 key and scale with one fused op of this contract instead of "
                "npu_dynamic_quant plus two npu_scatter_nd_update_ calls")
_site = functools.partial(PatchSite, versions=_VERSIONS_TEXT, remove_when=_REMOVE_WHEN)  # one release range, one fix
PATCHES: tuple[PatchSite, ...] = (
    _site(
        target="vllm_ascend.attention.sfa_v1.AscendSFAImpl.__init__",
        why="decides per layer (LI-C8, A5, standard e4m3fn, no reshape optimisation, no context parallel) "
            "whether the fused write applies, from the vLLM config only __init__ has",
        how="method replaced on the class; calls the original first, then records the layer's config",
    ),
    _site(
        target="vllm_ascend.attention.sfa_v1.AscendSFAImpl.indexer_select_pre_process",
        why="marks the one key quantization of an activated layer so the proxy below can hold it back",
        how="method replaced on the class; inactive layers call the original unchanged",
    ),
    _site(
        target="vllm_ascend.attention.sfa_v1.torch_npu",
        why="the quantize-then-two-scatters write is inline code with no method to replace; for an activated "
            "layer the three calls become one custom.indexer_compress_epilog",
        how="module global replaced by a proxy that forwards every other attribute to the real torch_npu",
    ),
)

INIT_SITE, PRE_PROCESS_SITE, TORCH_NPU_SITE = PATCHES


class SiteDrift(RuntimeError):
    """The inline write no longer runs in the order this hook was written against."""


@dataclass
class _Pending:
    config: EpilogConfig
    key: torch.Tensor  # unquantized indexer keys [T, d]
    scale_token: torch.Tensor  # stands in for the scales; never read
    key_cache: torch.Tensor | None = None

    def owns(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in (self.key.untyped_storage().data_ptr(),
                                                  self.scale_token.untyped_storage().data_ptr())

    def is_key(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() == self.key.untyped_storage().data_ptr()


class _Calls(threading.local):
    capturing: EpilogConfig | None = None
    quantized = False  # the captured quantization happened (with or without rows to write)
    pending: _Pending | None = None


calls = _Calls()


class TorchNpuProxy:
    """`torch_npu` as `sfa_v1` sees it: the real module, except for an activated layer's key write."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def npu_dynamic_quant(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        config = calls.capturing
        if config is None:
            return self._real.npu_dynamic_quant(x, *args, **kwargs)
        if calls.quantized:
            raise SiteDrift("indexer_select_pre_process quantized twice; the LI-C8 hook expects one key quantization")
        calls.quantized = True
        if x.numel() == 0:  # nothing to write; empty tensors may share a null storage, so track nothing
            return self._real.npu_dynamic_quant(x, *args, **kwargs)
        calls.pending = _Pending(config, x, torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))
        return x, calls.pending.scale_token

    def npu_scatter_nd_update_(self, cache: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> Any:
        pending = calls.pending
        if pending is None or not pending.owns(updates):
            return self._real.npu_scatter_nd_update_(cache, indices, updates)
        if pending.is_key(updates):
            if pending.key_cache is not None:
                raise SiteDrift("the indexer key was scattered twice before its scale")
            pending.key_cache = cache
            return cache
        if pending.key_cache is None:
            raise SiteDrift("the indexer scale was scattered before the key")
        calls.pending = None
        slots = indices.reshape(-1)
        if op_schema.defined_here():
            # The registered op, so graph capture and torch.compile see it; on an NPU its PrivateUse1 kernel
            # is backends/npu.py write_split (op/registration.py).
            torch.ops.custom.indexer_compress_epilog(pending.key_cache, cache, pending.key, slots,
                                                     quant_mode=pending.config.quant_mode,
                                                     round_scale=pending.config.round_scale)
        else:  # Ascend's custom_ops defined the op with its own schema: write_split maps our call onto it
            write_split(pending.key_cache, cache, pending.key, slots,
                        quant_mode=pending.config.quant_mode, round_scale=pending.config.round_scale)
        return cache


def _reshape_optim(layer: Any, sfa: Any) -> bool:
    """main asks the layer; the releases read the Ascend config inline."""
    if hasattr(layer, "_use_li_c8_reshape_optim"):
        return bool(layer._use_li_c8_reshape_optim())
    return bool(getattr(sfa.get_ascend_config(), "c8_enable_reshape_optim", False))


GATHER_METHODS = ("_prepare_kv_for_parallel", "_get_full_kv")
"""Where a context-parallel subclass gathers keys across ranks before the write: `_prepare_kv_for_parallel`
on main and from 0.27.1rc1, `_get_full_kv` in 0.23.0 (`AscendSFACPImpl`, prefill context parallel)."""


def _gathers_keys(layer: Any, base: dict[str, Any]) -> bool:
    """Context parallel all-gathers keys before the write: a subclass overriding a gather method, the
    releases' `enable_dsa_cp` flag, or a prefill/decode context-parallel group of more than one rank."""
    if bool(getattr(layer, "enable_dsa_cp", False)):
        return True
    if any(int(getattr(layer, size, 1) or 1) > 1 for size in ("pcp_size", "dcp_size")):
        return True
    return any(fn is not None and getattr(type(layer), name, None) is not fn for name, fn in base.items())


def _why_not(layer: Any, config: EpilogConfig, sfa: Any, base_gather: dict[str, Any]) -> str | None:
    if getattr(layer, "c8_k_cache_dtype", None) != torch.float8_e4m3fn:
        return ("Ascend A2/A3 keep LI-C8 keys as int8 with float16 scales for the int8 lightning indexer; "
                "no NPU reader of FP8 indexer keys exists there")
    if config.hifloat8:
        return ("no vllm-ascend site reads HiFloat8 keys: the lightning indexer reads LI-C8 keys as "
                "float8_e4m3fn with float32 scales")
    if config.quant_mode == QUANT_MODE_MX:
        return ("the lightning indexer reads LI-C8 key scales as float32 straight from the cache; "
                "no NPU reader of e8m0 scales exists on this path (use quant_mode \"standard\")")
    if config.fp8_dtype != torch.float8_e4m3fn:
        return "the lightning indexer reads LI-C8 keys as float8_e4m3fn only"
    if _reshape_optim(layer, sfa):
        return "c8_enable_reshape_optim writes through _C_ascend.store_kv_block, which this hook does not route"
    if _gathers_keys(layer, base_gather):
        return f"{type(layer).__name__} gathers keys across ranks (context parallel) before writing them"
    return None


def install(patcher: Patcher) -> str:
    sfa = import_site("vllm_ascend.attention.sfa_v1")
    impl = require(sfa, "AscendSFAImpl")
    require(impl, "__init__", "indexer_select_pre_process")
    try:
        init_source = inspect.getsource(impl.__init__)
    except (OSError, TypeError) as exc:
        raise SiteMissing(f"AscendSFAImpl.__init__ source unavailable ({exc})") from exc
    if LI_C8_MARKER not in init_source:
        raise SiteMissing("AscendSFAImpl has no LI-C8 indexer cache (enable_sparse_li_c8) in this vllm-ascend")
    if not hasattr(impl, "_use_li_c8_reshape_optim"):
        require(sfa, "get_ascend_config")
    real = require(sfa, "torch_npu")
    require(real, "npu_dynamic_quant", "npu_scatter_nd_update_")
    init, pre_process = impl.__init__, impl.indexer_select_pre_process
    base_gather = {name: getattr(impl, name, None) for name in GATHER_METHODS}

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        setattr(self, ATTR, None)
        if not getattr(self, "enable_sparse_li_c8", False):
            return
        config = epilog_config_from_vllm(self.vllm_config)
        if not config.enabled:
            log_once(f"{SITE}: disabled by indexer_epilog.enabled=false")
            return
        why = _why_not(self, config, sfa, base_gather)
        if why is not None:
            refuse(config, SITE, why)
            return
        setattr(self, ATTR, config)
        log_once(f"{SITE}: written by custom.indexer_compress_epilog ({config.describe()}); "
                 "read by the lightning indexer as float8_e4m3fn keys with float32 scales")

    def indexer_select_pre_process(self: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        config = getattr(self, ATTR, None)
        if config is None:
            return pre_process(self, x, cos, sin)
        if calls.pending is not None:
            calls.pending = None
            raise SiteDrift("the previous layer's LI-C8 key was never written: AscendSFAImpl.forward no longer "
                            "scatters the key and then its scale")
        calls.capturing, calls.quantized = config, False
        try:
            out = pre_process(self, x=x, cos=cos, sin=sin)
        finally:
            calls.capturing = None
        if not calls.quantized:
            raise SiteDrift("indexer_select_pre_process no longer quantizes the key with torch_npu.npu_dynamic_quant")
        return out

    patcher.set(impl, "__init__", __init__, INIT_SITE)
    patcher.set(impl, "indexer_select_pre_process", indexer_select_pre_process, PRE_PROCESS_SITE)
    patcher.set(sfa, "torch_npu", TorchNpuProxy(real), TORCH_NPU_SITE)
    return (f"hooked {impl.__name__}.__init__/indexer_select_pre_process and sfa_v1.torch_npu; "
            "active for LI-C8 layers on A5")
