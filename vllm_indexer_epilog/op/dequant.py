"""The op's inverse: FP8 codes and group scales back to float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import pow2
from .spec import FP8_FORMATS, GROUP_SIZE, num_groups


def mx_scales_to_float32(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu scales as float32 powers of two, by bit operations (an NPU need not cast e8m0).

    Exact for every byte the op writes (1..254); byte 0 would read 0 rather than 2^-127, byte 255 (NaN) +Inf.
    """
    return pow2(scale.view(torch.uint8).to(torch.int32) - 127)


def dequantize(
    cache: torch.Tensor, scale: torch.Tensor, slot_mapping: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 values of the cache rows ([N, d], or the rows `slot_mapping` names, -1 giving NaN).

    `cache` is e4m3fn/e5m2 `[..., d]`; `scale` is float32 (standard) or float8_e8m0fnu (MX) `[..., G]`.
    Rows of a group with scale 0 decode to 0 (NaN codes stay NaN).
    """
    if cache.dtype not in FP8_FORMATS:
        raise TypeError(f"cache must be float8_e4m3fn or float8_e5m2, got {cache.dtype}")
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
