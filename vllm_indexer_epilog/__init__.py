"""vllm-indexer-epilog: `custom.indexer_compress_epilog`, the FP8 KV-cache write of sparse-attention indexers.

Importing the package registers the op (see registration.py). It needs torch only; vLLM glue is
loaded by the plugin entry point, never from here.
"""

from __future__ import annotations

import torch

from .op.dequant import dequantize
from .op.reference import reference_indexer_compress_epilog
from .op import schema as _schema
from .op.registration import register as _register
from .op.registration import run_with_scale as _run_with_scale
from .op.spec import GROUP_SIZE, QUANT_MODE_HIFLOAT8, QUANT_MODE_MX, QUANT_MODE_STANDARD, num_groups
from .op.validation import validate_options, validate_tensor_types

_register()

__all__ = [
    "GROUP_SIZE",
    "QUANT_MODE_HIFLOAT8",
    "QUANT_MODE_MX",
    "QUANT_MODE_STANDARD",
    "dequantize",
    "indexer_compress_epilog",
    "num_groups",
    "reference_indexer_compress_epilog",
]


def indexer_compress_epilog(
    indexer_compress_cache: torch.Tensor,
    indexer_compress_scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    quant_mode: int = QUANT_MODE_STANDARD,
    round_scale: bool = True,
    scale: float = 1.0,
) -> None:
    """Quantize each row of `x` per 128-group to FP8 and scatter codes and scales to `slot_mapping` rows;
    with quant_mode=2, cast each element times `scale` to HiFloat8 (uint8 cache; the scale tensor untouched).

    The op of `torch.ops.custom.indexer_compress_epilog(...)` (contract: docs/SPEC.md), and the safe way to
    call it from Python: torch's argument parser silently turns `round_scale=None` or `0` into False and
    `quant_mode=True` into 1, whereas this raises TypeError/ValueError. On an NPU it goes through
    backends/npu.py, which maps the call onto whichever Ascend kernel is installed (torch.ops would reach
    Ascend's compiled op unmapped: int32 slots only).

    `scale` (HiFloat8 only; 1.0 otherwise) reaches the registered op where its schema has the argument
    (Ascend's); under ours, which has none, a scale other than 1.0 calls the same kernel of x's device
    directly (registration.run_with_scale), so the bytes do not depend on the entry point.
    """
    validate_options(quant_mode, round_scale, scale)
    validate_tensor_types(indexer_compress_cache, indexer_compress_scale, x, slot_mapping)
    if x.device.type == "npu":
        from .backends.npu import write_split

        write_split(indexer_compress_cache, indexer_compress_scale, x, slot_mapping,
                    quant_mode=quant_mode, round_scale=round_scale, scale=scale)
        return
    if _schema.has_foreign_scale_argument():
        torch.ops.custom.indexer_compress_epilog(indexer_compress_cache, indexer_compress_scale, x, slot_mapping,
                                                 quant_mode=quant_mode, round_scale=round_scale, scale=float(scale))
    elif scale != 1.0:
        _run_with_scale(indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode=quant_mode,
                        round_scale=round_scale, scale=float(scale))
    else:
        torch.ops.custom.indexer_compress_epilog(
            indexer_compress_cache, indexer_compress_scale, x, slot_mapping, quant_mode=quant_mode,
            round_scale=round_scale,
        )
