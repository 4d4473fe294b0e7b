"""Hook: DeepSeek-V3.2's LI-C8 indexer-key write on vllm-ascend (the LI-C8 cache: `enable_sparse_li_c8` /
`enable_sparse_c8` in --additional-config up to 0.28.0rc1, `--attention-config '{"indexer_kv_dtype": "fp8"}'`
from 0.29.0rc1).

Two layout generations, one mechanism (a `torch_npu` proxy that, for an activated layer's key only, hands
`npu_dynamic_quant`'s input back unquantized, then one `custom.indexer_compress_epilog` writes both caches):

- inline in `attention/sfa_v1.py` `AscendSFAImpl` (0.23.0, 0.24.0rc1, 0.25.1rc1, 0.26.0rc1, 0.27.1rc1; the
  flag is `use_sparse_c8_indexer` in 0.24.0rc1/0.25.1rc1): `indexer_select_pre_process` quantizes the
  Hadamard-rotated key with `torch_npu.npu_dynamic_quant` (per-row FP8 + float32 scale on A5), `forward`
  scatters key and scale with two `torch_npu.npu_scatter_nd_update_` calls. The proxy holds the key
  scatter back and turns the scale scatter -- the last of the three -- into the fused write.
- `attention/indexer.py` `AscendSFAIndexerBackend` (0.28.0rc1 .. 0.30.0rc2): `forward_k` quantizes the
  rotated key (inline, or in `_quantize_li_tensor` from 0.30.0rc1), `write_cache` writes key and scale with
  `DeviceOperator.scatter_cache` (or `store_kv_block`). `forward_k` is marked, `write_cache` replaced.
Anything out of that order raises instead of writing wrong bytes.

Activation happens in `__init__` (which has the vLLM config), per layer: only an LI-C8 cache of FP8 keys with
float32 scales (A5 up to 0.28.0rc1; `indexer_kv_dtype` fp8 from 0.29.0rc1), standard mode with e4m3fn (the
lightning indexer reads the float32 scale column straight from the cache: no NPU reader of e8m0 scales exists,
MX is refused). Refused there, at start-up: reshape optimisation (`store_kv_block`), context parallel
(keys gathered across ranks before the write), and an INT8 cache when the flag is set (otherwise one log line,
vllm-ascend's write kept); MXFP4 (C4) layers keep vllm-ascend's write with one log line. 0.23.0/0.24.0rc1
can switch an A5 cache to the activation dtype after `__init__`; the first forward (vLLM's profile run)
re-checks. Real-code checks per release: tests/integrations/vllm_ascend_real/real_sfa_li_c8.py.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import CONFIG_KEY, EpilogConfig, epilog_config_from_vllm
from ...backends.npu import write_split
from ...op import schema as op_schema
from ...op.spec import QUANT_MODE_MX
from ..patching import Patcher, SiteMissing, import_site, log_once, refuse, require
from ..catalogue import PatchSite

NAME = "sfa_li_c8"
WRITTEN_AGAINST = ("vllm-ascend 0.23.0 / 0.24.0rc1 / 0.25.1rc1 / 0.26.0rc1 / 0.27.1rc1 (inline in sfa_v1), 0.28.0rc1 / "
                   "0.29.0rc1 / 0.30.0rc1 / 0.30.0rc2 (AscendSFAIndexerBackend), main of 2026-08-22 (182b75ea84)")
VERSIONS = ((0, 23), (0, 31))
SITE = "vllm-ascend's DeepSeek-V3.2 LI-C8 indexer cache"
ATTR = "_indexer_epilog"
TRIGGERS = ("vllm_ascend.attention.sfa_v1", "vllm_ascend.attention.indexer")
SFA_MODULE, BACKEND_MODULE = TRIGGERS
LI_C8_FLAGS = ("enable_sparse_li_c8", "use_sparse_c8_indexer")
"""How AscendSFAImpl.__init__ turns the LI-C8 cache on (`use_sparse_c8_indexer` in 0.24.0rc1 and 0.25.1rc1,
where the indexer C8 came with the SFA C8 of `enable_sparse_c8`); a build without either has no site."""

_VERSIONS_TEXT = ("vllm-ascend 0.23.0 up to (not incl.) {}.{} (0.23.0 .. 0.27.1rc1 inline in sfa_v1, 0.28.0rc1 .. "
                  "0.30.0rc2 in AscendSFAIndexerBackend), and main of 2026-08-22").format(*VERSIONS[1])
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

_BACKEND = "vllm_ascend.attention.indexer.AscendSFAIndexerBackend"
_REMOVE_WHEN_BACKEND = ("AscendSFAIndexerBackend writes the LI-C8 key and scale with one fused op of this contract "
                        "instead of npu_dynamic_quant plus two DeviceOperator.scatter_cache calls")
_backend_site = functools.partial(PatchSite, versions=_VERSIONS_TEXT, remove_when=_REMOVE_WHEN_BACKEND)
BACKEND_PATCHES: tuple[PatchSite, ...] = (
    _backend_site(
        target=_BACKEND + ".__init__",
        why="from 0.28.0rc1 the indexer write lives in its own backend: decides per layer (LI-C8 with an FP8 "
            "cache and float32 scales, standard e4m3fn, no reshape optimisation, no PCP / DSA-CP gather) "
            "whether the fused write applies; INT8 and the MXFP4 C4 variant stay vllm-ascend's",
        how="method replaced on the class; calls the original first, then records the layer's config",
    ),
    _backend_site(
        target=_BACKEND + ".forward_k",
        why="marks the one key quantization of an activated layer (inline in 0.28/0.29, `_quantize_li_tensor` "
            "from 0.30.0rc1) so the proxy below hands back the rotated, unquantized key",
        how="method replaced on the class; inactive layers call the original unchanged",
    ),
    _backend_site(
        target=_BACKEND + ".write_cache",
        why="the two DeviceOperator.scatter_cache calls (key, then scale) become one "
            "custom.indexer_compress_epilog on the rotated key, writing both caches",
        how="method replaced on the class; inactive layers and empty batches call the original unchanged",
    ),
    _backend_site(
        target="vllm_ascend.attention.indexer.torch_npu",
        why="the key quantization is inline (forward_k) or in `_quantize_li_tensor`, shared with the query; "
            "for an activated layer's key only, npu_dynamic_quant returns the key unquantized",
        how="module global replaced by the same proxy as sfa_v1's (every other attribute forwarded)",
    ),
)
PATCHES = PATCHES + BACKEND_PATCHES

INIT_SITE, PRE_PROCESS_SITE, TORCH_NPU_SITE = PATCHES[:3]
BACKEND_INIT_SITE, FORWARD_K_SITE, WRITE_CACHE_SITE, BACKEND_TORCH_NPU_SITE = BACKEND_PATCHES


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


def _quantize_capturing(config: EpilogConfig, quantize: Callable[[], Any], quantizer: str, writer: str) -> Any:
    """Run the release's key quantization with the proxy capturing (both layout generations share this
    protocol): the previous layer's key must have been written, and this call must reach npu_dynamic_quant."""
    if calls.pending is not None:
        calls.pending = None
        raise SiteDrift(f"the previous layer's LI-C8 key was never written: {writer}")
    calls.capturing, calls.quantized = config, False
    try:
        out = quantize()
    finally:
        calls.capturing = None
    if not calls.quantized:
        raise SiteDrift(f"{quantizer} no longer quantizes the key with torch_npu.npu_dynamic_quant")
    return out


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
        fused_write(pending.config, pending.key_cache, cache, pending.key, indices.reshape(-1))
        return cache


def fused_write(config: EpilogConfig, key_cache: torch.Tensor, scale_cache: torch.Tensor, key: torch.Tensor,
                slots: torch.Tensor) -> None:
    """Quantize `key` ([T, d]) and scatter codes and scales at `slots` (-1 skips): one op call."""
    if op_schema.defined_here():
        # The registered op, so graph capture and torch.compile see it; on an NPU its PrivateUse1 kernel
        # is backends/npu.py write_split (op/registration.py).
        torch.ops.custom.indexer_compress_epilog(key_cache, scale_cache, key, slots,
                                                 quant_mode=config.quant_mode, round_scale=config.round_scale)
    else:  # Ascend's custom_ops defined the op with its own schema: write_split maps our call onto it
        write_split(key_cache, scale_cache, key, slots, quant_mode=config.quant_mode, round_scale=config.round_scale)


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


def _format_why_not(layer: Any, config: EpilogConfig) -> str | None:
    """The cache format: FP8 keys with one float32 scale per row is what the op writes; INT8 is not."""
    if getattr(layer, "c8_k_cache_dtype", None) != torch.float8_e4m3fn:
        return (f"the LI-C8 cache of this layer is {getattr(layer, 'c8_k_cache_dtype', None)} "
                f"(attention_config.indexer_kv_dtype={kv_dtype_of_current_config()!r}, from --attention-config "
                "or vllm-ascend's per-device default: int8 with float16 scales on A2/A3), not FP8 with float32 "
                f"scales, which is what {CONFIG_KEY} writes; the int8 lightning indexer keeps vllm-ascend's write")
    if config.quant_mode == QUANT_MODE_MX:
        return ("the lightning indexer reads LI-C8 key scales as float32 straight from the cache; "
                "no NPU reader of e8m0 scales exists on this path (use quant_mode \"standard\")")
    if config.fp8_dtype != torch.float8_e4m3fn:
        return "the lightning indexer reads LI-C8 keys as float8_e4m3fn only"
    return None


def kv_dtype_of_current_config() -> Any:
    """vLLM's indexer_kv_dtype of the config being built; None without one. Never imports vLLM itself."""
    vllm_config_module = sys.modules.get("vllm.config")
    try:
        return getattr(vllm_config_module.get_current_vllm_config().attention_config, "indexer_kv_dtype", None)
    except Exception:  # vLLM not imported, or no config set (tests building layers by hand)
        return None


def _why_not(layer: Any, config: EpilogConfig, sfa: Any, base_gather: dict[str, Any]) -> str | None:
    if getattr(layer, "c8_k_cache_dtype", None) != torch.float8_e4m3fn:
        return _format_why_not(layer, config)
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


def _still_fp8(layer: Any) -> EpilogConfig | None:
    """The layer's config if it is still activated. 0.23.0 / 0.24.0rc1 switch an A5 layer's LI-C8 cache to
    the activation dtype in process_weights_after_loading (unquantized MLAPO weights), after __init__ decided:
    the first forward -- vLLM's profile run, still start-up -- re-checks and refuses or hands the layer back."""
    config = getattr(layer, ATTR, None)
    if config is None:
        return None
    why = _format_why_not(layer, config)
    if why is None:
        return config
    object.__setattr__(layer, ATTR, None)
    refuse(config, SITE, why)
    return None


def install(patcher: Patcher) -> str:
    """One hook per layout generation: the backend (0.28.0rc1 on) when vllm-ascend has imported it, else the
    inline write in sfa_v1 (0.23.0 .. 0.27.1rc1). Neither module is imported here before vllm-ascend does."""
    backend_module = sys.modules.get(BACKEND_MODULE)
    if backend_module is not None and hasattr(getattr(backend_module, "AscendSFAIndexerBackend", None), "write_cache"):
        return _install_backend(patcher, backend_module)
    if SFA_MODULE not in sys.modules:
        raise SiteMissing(f"{BACKEND_MODULE} has no AscendSFAIndexerBackend.write_cache and {SFA_MODULE} "
                          "is not imported yet")
    return _install_inline(patcher)


def _install_inline(patcher: Patcher) -> str:
    sfa = import_site(SFA_MODULE)
    impl = require(sfa, "AscendSFAImpl")
    require(impl, "__init__", "indexer_select_pre_process")
    try:
        init_source = inspect.getsource(impl.__init__)
    except (OSError, TypeError) as exc:
        raise SiteMissing(f"AscendSFAImpl.__init__ source unavailable ({exc})") from exc
    flags = [flag for flag in LI_C8_FLAGS if f"self.{flag} =" in init_source]
    if not flags:
        raise SiteMissing("AscendSFAImpl has no LI-C8 indexer cache (enable_sparse_li_c8) in this vllm-ascend")
    li_c8_flag = flags[0]
    if not hasattr(impl, "_use_li_c8_reshape_optim"):
        require(sfa, "get_ascend_config")
    real = require(sfa, "torch_npu")
    require(real, "npu_dynamic_quant", "npu_scatter_nd_update_")
    init, pre_process = impl.__init__, impl.indexer_select_pre_process
    base_gather = {name: getattr(impl, name, None) for name in GATHER_METHODS}

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        setattr(self, ATTR, None)
        if not getattr(self, li_c8_flag, False):
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
        config = _still_fp8(self)
        if config is None:
            return pre_process(self, x, cos, sin)
        return _quantize_capturing(
            config, lambda: pre_process(self, x=x, cos=cos, sin=sin), "indexer_select_pre_process",
            "AscendSFAImpl.forward no longer scatters the key and then its scale")

    patcher.set(impl, "__init__", __init__, INIT_SITE)
    patcher.set(impl, "indexer_select_pre_process", indexer_select_pre_process, PRE_PROCESS_SITE)
    patcher.set(sfa, "torch_npu", TorchNpuProxy(real), TORCH_NPU_SITE)
    return (f"hooked {impl.__name__}.__init__/indexer_select_pre_process and sfa_v1.torch_npu; "
            "active for LI-C8 layers on A5")


def _backend_why_not(layer: Any, config: EpilogConfig) -> str | None:
    why = _format_why_not(layer, config)
    if why is not None:
        return why
    if layer._use_c8_reshape_optim():
        return ("c8_reshape_optim_enabled (c8_enable_reshape_optim on a prefill node) writes through "
                "_C_ascend.store_kv_block, which this hook does not route; set "
                "--additional-config '{\"c8_enable_reshape_optim\": false}' to use the fused write")
    if getattr(layer, "_pcp_active", False) or getattr(layer, "_dsa_cp_active", False):
        return ("prefill context parallel / DSA-CP all-gathers the quantized key before the write; the fused "
                "write would gather the unquantized key instead (twice the bytes), so it is not routed")
    return None


def _install_backend(patcher: Patcher, module: Any) -> str:
    backend = require(module, "AscendSFAIndexerBackend")
    require(backend, "__init__", "forward_k", "write_cache", "_use_c8_reshape_optim")
    require(module, "INDEXER_K_CACHE_SLOT", "INDEXER_SCALE_CACHE_SLOT")
    real = require(module, "torch_npu")
    require(real, "npu_dynamic_quant")
    init, forward_k, write_cache = backend.__init__, backend.forward_k, backend.write_cache
    k_slot, s_slot = module.INDEXER_K_CACHE_SLOT, module.INDEXER_SCALE_CACHE_SLOT

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        object.__setattr__(self, ATTR, None)  # nn.Module: a plain attribute, not a submodule or buffer
        if getattr(self, "enable_sparse_li_c4", False):
            log_once(f"{SITE}: MXFP4 (C4) indexer cache layers are outside {CONFIG_KEY}'s FP8 contract; "
                     "vllm-ascend's own write is kept for them")
            return
        if not getattr(self, "enable_sparse_li_c8", False):
            return
        from vllm.config import get_current_vllm_config  # vllm-ascend's indexer.py imported it already

        config = epilog_config_from_vllm(get_current_vllm_config())
        if not config.enabled:
            log_once(f"{SITE}: disabled by indexer_epilog.enabled=false")
            return
        why = _backend_why_not(self, config)
        if why is not None:
            refuse(config, SITE, why)
            return
        object.__setattr__(self, ATTR, config)
        log_once(f"{SITE}: written by custom.indexer_compress_epilog ({config.describe()}) in "
                 "AscendSFAIndexerBackend.write_cache; read by the lightning indexer as float8_e4m3fn keys "
                 "with float32 scales")

    def forward_k_hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = _still_fp8(self)
        if config is None:
            return forward_k(self, *args, **kwargs)
        return _quantize_capturing(
            config, lambda: forward_k(self, *args, **kwargs), "forward_k",
            "AscendSFAIndexerBackend.forward no longer calls write_cache after forward_k")

    def write_cache_hooked(self: Any, k_li: torch.Tensor, k_li_scale: Any, slot_mapping: torch.Tensor,
                           *args: Any, **kwargs: Any) -> None:
        config = getattr(self, ATTR, None)
        pending = calls.pending
        if config is None or (pending is None and k_li.numel() == 0):
            return write_cache(self, k_li, k_li_scale, slot_mapping, *args, **kwargs)
        if pending is None or not pending.is_key(k_li) or k_li_scale is None or not pending.owns(k_li_scale) \
                or pending.is_key(k_li_scale):
            calls.pending = None
            raise SiteDrift("write_cache did not receive the key and scale forward_k produced for this layer")
        calls.pending = None
        caches = self.k_cache.kv_cache
        d = pending.key.shape[-1]
        fused_write(config, caches[k_slot].view(-1, d), caches[s_slot].view(-1, 1), pending.key.view(-1, d),
                    slot_mapping.reshape(-1))

    patcher.set(backend, "__init__", __init__, BACKEND_INIT_SITE)
    patcher.set(backend, "forward_k", forward_k_hooked, FORWARD_K_SITE)
    patcher.set(backend, "write_cache", write_cache_hooked, WRITE_CACHE_SITE)
    patcher.set(module, "torch_npu", TorchNpuProxy(real), BACKEND_TORCH_NPU_SITE)
    return ("hooked AscendSFAIndexerBackend.__init__/forward_k/write_cache and indexer.torch_npu; "
            "active for LI-C8 layers with an FP8 cache")
