"""The one stand-in of the NPU ops the hooked sites reach, on CPU tensors: torch_npu's `npu_dynamic_quant` and
`npu_scatter_nd_update_` (recording their calls) and vllm-ascend's compiled `_C_ascend.indexer_compress_epilog_v2`.

Both stand-in layers use it: the reduced sites (`tests/fakes/npu/`, whose `torch_npu` and `fake_ascend_ops` are
thin shells over this module) and the real vllm-ascend releases (`tests/integrations/vllm_ascend_real/
npu_standin.py`, which adds the rest of a torch_npu module around it). Imported as `fakes.npu_ops` (tests/ on
sys.path). Codes and scales come from the project's reference, standard mode.
"""

from __future__ import annotations

from typing import Any

import torch

# The package is imported only when the op is defined: the real-release stand-in must install its torch_npu
# before the package's import looks for one.
_v2: dict[str, Any] = {}  # the library (kept alive) and the call record: the op is defined once per process


class RecordingNpuOps:
    """torch_npu's two indexer-write calls, each appending `(name, details)` to `self.calls`.

    One instance per stand-in torch_npu module, so a fresh import starts with no calls."""

    def __init__(self, calls: list[tuple[str, dict]] | None = None) -> None:
        self.calls = [] if calls is None else calls

    def npu_dynamic_quant(self, x: torch.Tensor, dst_type: torch.dtype | None = None, **_: Any):  # noqa: ANN201
        """Per-row symmetric quantization (vllm-ascend's stock indexer-key path): codes and float32 row scales."""
        dst_type = torch.int8 if dst_type is None else dst_type
        self.calls.append(("npu_dynamic_quant", {"shape": tuple(x.shape), "dst_type": dst_type}))
        top = 127.0 if dst_type == torch.int8 else torch.finfo(dst_type).max
        scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / top
        q = x.float() / scale.unsqueeze(-1)
        codes = q.round().clamp(-128, 127).to(torch.int8) if dst_type == torch.int8 else q.to(dst_type)
        return codes, scale

    def npu_scatter_nd_update_(self, cache: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        self.calls.append(("npu_scatter_nd_update_", {"cache": tuple(cache.shape), "updates_dtype": updates.dtype}))
        rows = indices.reshape(-1).long()
        keep = rows >= 0
        flat = cache.view(-1, cache.shape[-1])
        flat[rows[keep]] = updates.reshape(rows.numel(), cache.shape[-1])[keep].to(cache.dtype)
        return cache


def define_indexer_compress_epilog_v2(calls: list[dict], *, strict_args: bool) -> None:
    """Define `_C_ascend.indexer_compress_epilog_v2` on CPU, once per process, recording each call into `calls`.

    It reads only what the Ascend C op reads (its tiling and binding): a uint8 cache [nb, bs, 1, row bytes] whose
    stride(0) is the block stride, x [T, d], slots, layout 2; each block holds bs·d code bytes, then bs·G float32
    scales. A buffer narrower than a whole row (d + 4·G bytes: vllm-ascend's 1-row warmup) is recorded, not
    written. `strict_args` also asserts the binding's argument types (int32 slots, float16/bfloat16 x), which the
    plugin's own calls must meet; the real releases' own warmup call is left unchecked.
    """
    if _v2:
        assert _v2["calls"] is calls, "_C_ascend.indexer_compress_epilog_v2 is already defined with another record"
        return
    from vllm_indexer_epilog.op.reference import quantize_rows
    from vllm_indexer_epilog.op.spec import FP8_FORMATS, QUANT_MODE_STANDARD, num_groups

    lib = torch.library.Library("_C_ascend", "FRAGMENT")
    lib.define("indexer_compress_epilog_v2(Tensor(a!) indexer_compress_cache, Tensor x, Tensor slot_mapping, "
               "int layout=2) -> ()")

    def v2(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, layout: int = 2) -> None:
        assert cache.dtype == torch.uint8 and cache.dim() == 4 and layout == 2, "v2 takes a uint8 [nb, bs, 1, D] cache"
        if strict_args:
            assert cache.shape[2] == 1, "v2 takes a uint8 [nb, bs, 1, D] cache"
            assert slot_mapping.dtype == torch.int32, "v2 takes int32 slots"
            assert x.dtype in (torch.float16, torch.bfloat16)
        d = x.shape[-1]
        g = num_groups(d)
        calls.append({"shape": tuple(cache.shape), "block_stride": cache.stride(0), "x": x,
                         "slots": slot_mapping.clone(), "storage": cache.untyped_storage().data_ptr(),
                         "offset": cache.storage_offset()})
        if cache.shape[-1] < d + 4 * g:
            return
        bs = cache.shape[1]
        flat = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())
        codes, scales = quantize_rows(x.reshape(-1, d), FP8_FORMATS[torch.float8_e4m3fn], QUANT_MODE_STANDARD, True)
        for r, s in enumerate(slot_mapping.reshape(-1).tolist()):
            if s < 0:
                continue
            base = cache.storage_offset() + (s // bs) * cache.stride(0)
            off = s % bs
            flat[base + off * d : base + (off + 1) * d] = codes[r]
            at = base + bs * d + off * g * 4
            flat[at : at + g * 4] = scales[r].contiguous().view(torch.uint8)

    lib.impl("indexer_compress_epilog_v2", v2, "CPU")
    _v2.update(library=lib, calls=calls)
