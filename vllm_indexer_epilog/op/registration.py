"""Defines `custom::indexer_compress_epilog` (unless Ascend's custom_ops already did) and its kernels.

Rule for a pre-existing definition: cann-recipes-infer's `custom_ops` package defines an op of the same
qualified name for NPU, with an extra `float scale=1.0` argument. If the name exists when this module is
imported, nothing is redefined; only kernels for dispatch keys it lacks (CPU, CUDA, Meta) are added, and
they accept and refuse its extra argument. On a machine with torch_npu, Ascend's package is imported
before anything is defined here, so its definition always wins and its import never fails because of us.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Any, Callable

import torch

from .reference import reference_indexer_compress_epilog
from .schema import OP_NAME, QUALNAME, SCHEMA, defined_here, has_kernel, has_schema, mark_defined_here, schema
from .spec import QUANT_MODE_STANDARD
from .validation import validate_epilog_args

logger = logging.getLogger(__name__)

ASCEND_CUSTOM_OPS_MODULE = "custom_ops"
"""cann-recipes-infer's package that defines the compiled NPU op under the same qualified name."""

_lib: torch.library.Library | None = None


def _let_ascend_define_first() -> None:
    """On an NPU machine, import Ascend's custom_ops before defining anything: its library defines
    custom::indexer_compress_epilog itself and would fail to import if ours came first. Only when
    torch_npu is installed, so that an unrelated module of that name elsewhere is never touched."""
    if importlib.util.find_spec("torch_npu") is None or importlib.util.find_spec(ASCEND_CUSTOM_OPS_MODULE) is None:
        return
    try:
        importlib.import_module(ASCEND_CUSTOM_OPS_MODULE)
    except Exception as exc:  # a broken CANN install must not break this package
        logger.warning("vllm_indexer_epilog: importing Ascend's %s failed (%s: %s); defining the op here",
                       ASCEND_CUSTOM_OPS_MODULE, type(exc).__name__, exc)


Run = Callable[..., None]
"""A kernel body, called as `run(cache, scale, x, slot_mapping, quant_mode=..., round_scale=..., scale=...)`;
`scale` (HiFloat8's multiplier) is 1.0 under our schema, which has no such argument."""


def as_kernel(run: Run) -> Callable[..., None]:
    """The dispatcher-facing kernel for `run`: the op's Python signature, plus Ascend's `float scale` where
    its schema is the registered one (passed on; validation refuses it unless quant_mode=2 or it is 1.0)."""

    def kernel(
        indexer_compress_cache: torch.Tensor,
        indexer_compress_scale: torch.Tensor,
        x: torch.Tensor,
        slot_mapping: torch.Tensor,
        quant_mode: int = QUANT_MODE_STANDARD,
        round_scale: bool = True,
        **extra: Any,
    ) -> None:
        for key, value in extra.items():
            if key != "scale":
                raise ValueError(f"{key}={value!r} is not supported by the vllm_indexer_epilog kernels")
        run(indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode=quant_mode,
            round_scale=round_scale, scale=extra.get("scale", 1.0))

    kernel.__name__ = kernel.__qualname__ = run.__name__
    return kernel


def run_cpu(cache: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, *,
            quant_mode: int, round_scale: bool, scale: float = 1.0, promote: bool = True) -> None:
    """CPU calls that reach Python: before the compiled kernel is registered (first use on this machine),
    when it cannot be built, or a HiFloat8 `scale` that our schema cannot carry (the public wrapper). The
    compiled entry point runs every check itself."""
    from ..backends.cpu import LIBRARY, load_cpu_kernel

    if load_cpu_kernel():
        if promote:
            _promote_native_cpu_kernel()
        getattr(torch.ops, LIBRARY).quantize_scatter(cache, scales, x, slot_mapping, quant_mode, round_scale, scale)
        return
    # No compiled kernel on this machine: the reference validates, checks the slots (strict mode included)
    # and writes each slot's last row, as the compiled kernel does.
    reference_indexer_compress_epilog(cache, scales, x, slot_mapping, quant_mode=quant_mode, round_scale=round_scale,
                                      scale=scale)


def _promote_native_cpu_kernel() -> None:
    """Once the compiled kernel is loaded, make it the CPU kernel, so later calls skip Python.

    Only when no CPU kernel exists (the op was defined here and CPU calls reach this through the
    CompositeExplicitAutograd kernel): replacing a registered Python kernel while it runs is not safe.
    """
    from ..backends.cpu import native_kernel_registered, register_native_kernel

    if not native_kernel_registered() and not has_kernel("CPU"):
        register_native_kernel()


def run_default(cache: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor,
                **options: Any) -> None:
    """CompositeExplicitAutograd: any device without its own kernel gets the reference; CPU gets here only
    until the compiled kernel is registered (run_cpu builds and registers it on the first call)."""
    run = run_cpu if x.device.type == "cpu" else reference_indexer_compress_epilog
    run(cache, scales, x, slot_mapping, **options)


@functools.cache
def _triton_launcher() -> Callable[..., None] | None:
    try:
        from ..backends.triton_kernel import triton_indexer_compress_epilog
    except ImportError as exc:
        logger.warning("vllm_indexer_epilog: Triton unavailable (%s); CUDA calls use the torch reference", exc)
        return None
    return triton_indexer_compress_epilog


def run_cuda(*args: Any, **options: Any) -> None:
    """The Triton kernel, or the reference where Triton is unavailable."""
    (_triton_launcher() or reference_indexer_compress_epilog)(*args, **options)


def run_npu(*args: Any, **options: Any) -> None:
    """backends/npu.py, imported on the first NPU call: it maps the call onto whichever Ascend kernel is there."""
    from ..backends.npu import write_split

    write_split(*args, **options)


def run_fake(cache: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, *,
             quant_mode: int, round_scale: bool, scale: float = 1.0) -> None:
    # Metadata checks need no values, so tracing reports bad calls as eagerly as running them would.
    validate_epilog_args(cache, scales, x, slot_mapping, quant_mode, round_scale, scale_value=scale)


def run_with_scale(cache: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, *,
                   quant_mode: int, round_scale: bool, scale: float) -> None:
    """The op with a HiFloat8 `scale` that the registered schema cannot carry (ours has no `scale`): the
    kernel of x's device, called directly. The same kernels as the dispatcher's, so both entry points
    write the same bytes."""
    device = x.device.type
    if device == "cpu":
        run_cpu(cache, scales, x, slot_mapping, quant_mode=quant_mode, round_scale=round_scale, scale=scale,
                promote=False)
    elif device == "cuda":
        run_cuda(cache, scales, x, slot_mapping, quant_mode=quant_mode, round_scale=round_scale, scale=scale)
    elif device == "npu":
        run_npu(cache, scales, x, slot_mapping, quant_mode=quant_mode, round_scale=round_scale, scale=scale)
    else:
        reference_indexer_compress_epilog(cache, scales, x, slot_mapping, quant_mode=quant_mode,
                                          round_scale=round_scale, scale=scale)


def register() -> None:
    """Idempotent: define the op if absent, then add the kernels it lacks."""
    global _lib
    if _lib is not None:
        return
    _let_ascend_define_first()
    _lib = torch.library.Library(QUALNAME.split('::')[0], "FRAGMENT")
    if not has_schema():
        _lib.define(OP_NAME + SCHEMA)
        mark_defined_here()
    else:
        logger.info("%s already defined (schema %s); adding only missing kernels", QUALNAME, schema())
    _register_cpu_kernel()
    # PrivateUse1 is the NPU's key: present only when Ascend's compiled op did not claim it.
    for key, run in (("CUDA", run_cuda), ("PrivateUse1", run_npu)):
        if not has_kernel(key):
            _lib.impl(OP_NAME, as_kernel(run), key)
    if defined_here():
        # Any other device (XPU, MPS, ...) gets the reference: slow but exact. CPU tensors land here only
        # while the compiled CPU kernel is not registered yet.
        _lib.impl(OP_NAME, as_kernel(run_default), "CompositeExplicitAutograd")
    if not has_kernel("Meta"):
        torch.library.register_fake(QUALNAME, as_kernel(run_fake), lib=_lib)


def _register_cpu_kernel() -> None:
    """The CPU kernel is the compiled one, registered from C++ (no Python on the call path), whenever this
    machine's build is cached. Otherwise: defined here, CPU calls fall to CompositeExplicitAutograd, whose
    first CPU call builds and registers it; under a foreign schema, a Python kernel that calls the
    compiled entry point (native from the next process on)."""
    if has_kernel("CPU"):
        return
    from ..backends.cpu import load_prebuilt_kernel, register_native_kernel

    if load_prebuilt_kernel() and register_native_kernel():
        return
    if not defined_here():
        assert _lib is not None
        _lib.impl(OP_NAME, as_kernel(run_cpu), "CPU")
