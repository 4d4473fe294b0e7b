"""The op's name and schema, and what the dispatcher knows of it (whoever defined it: us or Ascend's custom_ops).

Backends ask here, not registration.py, whether the op exists and which kernels it has, so that nothing
below registration imports it.
"""

from __future__ import annotations

import torch

NAMESPACE = "custom"
OP_NAME = "indexer_compress_epilog"
QUALNAME = f"{NAMESPACE}::{OP_NAME}"
SCHEMA = (
    "(Tensor(a!) indexer_compress_cache, Tensor(b!) indexer_compress_scale, Tensor x, Tensor slot_mapping, "
    "*, int quant_mode=1, bool round_scale=True) -> ()"
)

_defined_here = False


def mark_defined_here() -> None:
    global _defined_here
    _defined_here = True


def defined_here() -> bool:
    """Whether this package defined the op (False when Ascend's custom_ops had defined it first)."""
    return _defined_here


def has_schema() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(QUALNAME, "")
        return True
    except RuntimeError:
        return False


def schema() -> torch.FunctionSchema:
    return getattr(torch.ops, NAMESPACE).indexer_compress_epilog.default._schema


def has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(QUALNAME, key)


def has_foreign_scale_argument() -> bool:
    """Ascend's definition carries an extra `float scale=1.0` argument."""
    return has_schema() and any(a.name == "scale" for a in schema().arguments)
