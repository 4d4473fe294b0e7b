"""The op's inverse: FP8 codes and group scales back to float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hifloat8 import decode_hifloat8
from .reference import pow2
from .spec import FP8_FORMATS, GROUP_SIZE, num_groups


def mx_scales_to_float32(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu scales as float32 powers of two, by bit operations (an NPU need not cast e8m0).

    Exact for every byte the op writes (1..254); byte 0 would read 0 rather than 2^-127, byte 255 (NaN) +Inf.
    """
    return pow2(scale.view(torch.uint8).to(torch.int32) - 127)


def dequantize(
    cache: torch.Tensor, scale: torch.Tensor | None, slot_mapping: torch.Tensor | None = None, *,
    scale_value: float = 1.0,
) -> torch.Tensor:
    """float32 values of the cache rows ([N, d], or the rows `slot_mapping` names, -1 giving NaN).

    `cache` is e4m3fn/e5m2 `[..., d]`; `scale` is float32 (standard) or float8_e8m0fnu (MX) `[..., G]`.
    Rows of a group with scale 0 decode to 0 (NaN codes stay NaN).

    A uint8 cache holds HiFloat8 codes (quant_mode=2): the values are the exact decoded codes divided by
    `scale_value`, the op's `scale` (one float32 division: exact for a power of two, else correctly rounded);
    the `scale` tensor carries nothing in that mode and is not read (None is accepted).
    """
    if cache.dtype == torch.uint8:
        if isinstance(scale_value, bool) or not isinstance(scale_value, (int, float)) or scale_value == 0:
            raise ValueError(f"scale_value must be a non-zero float, got {scale_value!r}")
        codes = cache.reshape(-1, cache.shape[-1]) if cache.dim() else cache.reshape(1, 1)
        if slot_mapping is not None:
            idx = slot_mapping.reshape(-1).long()
            values = decode_hifloat8(codes[idx.clamp(min=0)])
            values = torch.where((idx >= 0)[:, None], values, float("nan"))
        else:
            values = decode_hifloat8(codes)
        if scale_value != 1.0:
            values = values / torch.tensor(scale_value, dtype=torch.float32, device=values.device)
        return values.contiguous()
    if scale is None:
        raise TypeError("scale must be a tensor for an fp8 cache")
    if cache.dtype not in FP8_FORMATS:
        raise TypeError(f"cache must be float8_e4m3fn, float8_e5m2 or uint8 (HiFloat8), got {cache.dtype}")
    if scale.dtype not in (torch.float32, torch.float8_e8m0fnu):
        raise TypeError(f"scale must be float32 or float8_e8m0fnu, got {scale.dtype}")
    d = cache.shape[-1]
    g = num_groups(d)
    if scale.shape[-1] != g or scale.numel() // g != cache.numel() // d:
        raise ValueError(f"scale must have shape [N, {g}] matching cache [N, {d}], got {tuple(scale.shape)}")
    codes = cache.reshape(-1, d)
    s = scale.reshape(-1, g).to(torch.float32)
    if slot_mapping is not None:
        idx = slot_mapping.reshape(-1).long()
        valid = idx >= 0
        codes, s = codes[idx.clamp(min=0)], s[idx.clamp(min=0)]
        s = torch.where(valid[:, None], s, float("nan"))
    rows = codes.shape[0]
    values = F.pad(codes.to(torch.float32), (0, -d % GROUP_SIZE)).view(rows, g, GROUP_SIZE)
    out = (values * s[:, :, None]).view(rows, -1)[:, :d]
    return out.contiguous()
