"""Stand-in of cann-recipes-infer's custom_ops: defines custom::indexer_compress_epilog with its extra
`scale` argument and registers an "NPU" kernel (PrivateUse1, and CPU so that CPU stand-in tensors reach it)
that records its calls and computes with the project's reference."""

import torch

CALLS = []

_lib = torch.library.Library("custom", "DEF")
_lib.define("indexer_compress_epilog(Tensor(a!) indexer_compress_cache, Tensor(b!) indexer_compress_scale, Tensor x, "
            "Tensor slot_mapping, *, int quant_mode=1, bool round_scale=True, float scale=1.0) -> ()")


def _kernel(cache, scale_t, x, slot_mapping, quant_mode=1, round_scale=True, scale=1.0):
    assert slot_mapping.dtype == torch.int32, "the Ascend op takes int32 slots only"
    assert x.dtype in (torch.float16, torch.bfloat16), "the Ascend op takes float16/bfloat16 x only"
    CALLS.append({"slots": slot_mapping.clone(), "quant_mode": quant_mode, "round_scale": round_scale, "scale": scale})
    from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

    # HiFloat8 (quant_mode=2): the real kernel saturates (docs/hifloat8.md); the stand-in computes SPEC's cast.
    reference_indexer_compress_epilog(cache, scale_t, x, slot_mapping, quant_mode=quant_mode, round_scale=round_scale,
                                      scale=scale)


for _key in ("PrivateUse1", "CPU"):
    _lib.impl("indexer_compress_epilog", _kernel, _key)
