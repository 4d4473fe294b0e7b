"""Stand-in of vllm-ascend's compiled `_C_ascend.indexer_compress_epilog_v2`, on CPU.

Reads only what the Ascend C op reads (from its tiling and binding): a uint8 cache [nb, bs, 1, row_bytes]
whose stride(0) is the block stride, x [T, d], int32 slots, layout 2; each block holds bs*d code bytes
then bs*ceil(d/128) float32 scales. Codes and scales come from the project's reference, standard mode.
"""

from __future__ import annotations

import torch

from vllm_indexer_epilog.op.reference import quantize_rows
from vllm_indexer_epilog.op.spec import FP8_FORMATS, QUANT_MODE_STANDARD, num_groups

V2_CALLS: list[dict] = []

_lib = torch.library.Library("_C_ascend", "DEF")
_lib.define("indexer_compress_epilog_v2(Tensor(a!) indexer_compress_cache, Tensor x, Tensor slot_mapping, int layout=2) -> ()")


def _v2(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, layout: int = 2) -> None:
    assert cache.dtype == torch.uint8 and cache.dim() == 4 and cache.shape[2] == 1, "v2 takes a uint8 [nb, bs, 1, D] cache"
    assert slot_mapping.dtype == torch.int32, "v2 takes int32 slots"
    assert x.dtype in (torch.float16, torch.bfloat16) and layout == 2
    V2_CALLS.append({"shape": tuple(cache.shape), "block_stride": cache.stride(0), "x": x, "slots": slot_mapping.clone(),
                     "storage": cache.untyped_storage().data_ptr(), "offset": cache.storage_offset()})
    bs, d = cache.shape[1], x.shape[-1]
    g = num_groups(d)
    flat = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())
    codes, scales = quantize_rows(x.reshape(-1, d), FP8_FORMATS[torch.float8_e4m3fn], QUANT_MODE_STANDARD, True)
    for r, s in enumerate(slot_mapping.reshape(-1).tolist()):
        if s < 0:
            continue
        base = cache.storage_offset() + (s // bs) * cache.stride(0)
        off = s % bs
        flat[base + off * d: base + (off + 1) * d] = codes[r]
        at = base + bs * d + off * g * 4
        flat[at: at + g * 4] = scales[r].contiguous().view(torch.uint8)


_lib.impl("indexer_compress_epilog_v2", _v2, "CPU")
