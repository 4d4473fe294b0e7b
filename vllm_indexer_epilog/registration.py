"""Defines `custom::indexer_compress_epilog` (unless Ascend's custom_ops already did) and its kernels.

Rule for a pre-existing definition: cann-recipes-infer's `custom_ops` package defines an op of the same
qualified name for NPU, with an extra `float scale=1.0` argument. If the name exists when this module is
imported, nothing is redefined; only kernels for dispatch keys it lacks (CPU, CUDA, Meta) are added, and
they accept and refuse its extra argument. Importing Ascend's package first on NPU machines is the
Ascend integration's job.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from .reference import reference_indexer_compress_epilog
from .spec import QUANT_MODE_STANDARD
from .validation import check_slot_range, validate_epilog_args

logger = logging.getLogger(__name__)

NAMESPACE = "custom"
OP_NAME = "indexer_compress_epilog"
QUALNAME = f"{NAMESPACE}::{OP_NAME}"
SCHEMA = (
    "(Tensor(a!) indexer_compress_cache, Tensor(b!) indexer_compress_scale, Tensor x, Tensor slot_mapping, "
    "*, int quant_mode=1, bool round_scale=True) -> ()"
)

_lib: torch.library.Library | None = None
defined_here = False


def _reject_extra(extra: dict[str, Any]) -> None:
    """Arguments that only a foreign schema has (Ascend's `scale` for its hifloat8 mode)."""
    for key, value in extra.items():
        if not (key == "scale" and value == 1.0):
            raise ValueError(f"{key}={value!r} is not supported by the vllm_indexer_epilog kernels")


def cpu_impl(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    quant_mode: int = QUANT_MODE_STANDARD,
    round_scale: bool = True,
    **extra: Any,
) -> None:
    _reject_extra(extra)
    p = validate_epilog_args(indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode, round_scale)
    check_slot_range(slot_mapping, p.slots)
    if p.rows == 0:
        return
    from .cpu_kernel import load_cpu_kernel

    if load_cpu_kernel():
        torch.ops.vllm_indexer_epilog_cpu.quantize_scatter(
            indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode, round_scale
        )
    else:
        reference_indexer_compress_epilog(
            indexer_compress_cache, indexer_compress_scale, x, slot_mapping,
            quant_mode=quant_mode, round_scale=round_scale,
        )


def cuda_impl(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    quant_mode: int = QUANT_MODE_STANDARD,
    round_scale: bool = True,
    **extra: Any,
) -> None:
    _reject_extra(extra)
    launch = _triton_launcher()
    if launch is not None:
        launch(
            indexer_compress_cache, indexer_compress_scale, x, slot_mapping,
            quant_mode=quant_mode, round_scale=round_scale,
        )
    else:
        reference_indexer_compress_epilog(
            indexer_compress_cache, indexer_compress_scale, x, slot_mapping,
            quant_mode=quant_mode, round_scale=round_scale,
        )


@functools.cache
def _triton_launcher() -> Callable[..., None] | None:
    try:
        from .triton_kernel import triton_indexer_compress_epilog
    except ImportError as exc:
        logger.warning("vllm_indexer_epilog: Triton unavailable (%s); CUDA calls use the torch reference", exc)
        return None
    return triton_indexer_compress_epilog


def reference_impl(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    quant_mode: int = QUANT_MODE_STANDARD,
    round_scale: bool = True,
    **extra: Any,
) -> None:
    _reject_extra(extra)
    reference_indexer_compress_epilog(
        indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode=quant_mode, round_scale=round_scale
    )


def fake_impl(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    quant_mode: int = QUANT_MODE_STANDARD,
    round_scale: bool = True,
    **extra: Any,
) -> None:
    # Metadata checks need no values, so tracing reports bad calls as eagerly as running them would.
    _reject_extra(extra)
    validate_epilog_args(indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode, round_scale)


def _has_schema() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(QUALNAME, "")
        return True
    except RuntimeError:
        return False


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(QUALNAME, key)


def register() -> None:
    """Idempotent: define the op if absent, then add the kernels it lacks."""
    global _lib, defined_here
    if _lib is not None:
        return
    _lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    if not _has_schema():
        _lib.define(OP_NAME + SCHEMA)
        defined_here = True
    else:
        logger.info("%s already defined (schema %s); adding only missing kernels", QUALNAME,
                    torch._C._dispatch_find_schema_or_throw(QUALNAME, "").schema)
    kernels: tuple[tuple[str, Callable[..., None]], ...] = (("CPU", cpu_impl), ("CUDA", cuda_impl))
    for key, fn in kernels:
        if not _has_kernel(key):
            _lib.impl(OP_NAME, fn, key)
    if defined_here:
        # Any other device (XPU, MPS, ...) gets the reference: slow but exact.
        _lib.impl(OP_NAME, reference_impl, "CompositeExplicitAutograd")
    if not _has_kernel("Meta"):
        torch.library.register_fake(QUALNAME, fake_impl, lib=_lib)
