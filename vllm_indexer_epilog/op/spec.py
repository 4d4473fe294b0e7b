"""Numeric constants of the op's contract (docs/SPEC.md); every backend reads them from here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 128
"""Elements per quantization group; the last group of a row may be shorter."""

MX_AMAX_FLOOR = 1e-4
"""MX mode floors the group amax here (as float32) before deriving the power-of-two scale."""

NAN_CODE = 0x7F
"""Canonical NaN byte, for both fp8 formats."""

QUANT_MODE_MX = 0
QUANT_MODE_STANDARD = 1
QUANT_MODE_HIFLOAT8 = 2
"""HiFloat8 (docs/SPEC.md, docs/hifloat8.md): each element times `scale`, cast to HiF8; no group scale."""

SCALE_DTYPE_BY_MODE: dict[int, torch.dtype] = {
    QUANT_MODE_MX: torch.float8_e8m0fnu,
    QUANT_MODE_STANDARD: torch.float32,
    # Mode 2 takes a float32 [..., G] scale tensor (cann-recipes passes its scale cache) and never writes it.
    QUANT_MODE_HIFLOAT8: torch.float32,
}

HIF8_CACHE_DTYPE = torch.uint8
"""Mode 2's cache dtype: torch has no HiFloat8 dtype, so the bytes are the HiF8 codes."""

DSV4_INDEXER_HEAD_DIM = GROUP_SIZE
"""DeepSeek-V4's index_head_dim: its FP8 indexer cache rows are one group with one scale, on every platform."""

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SLOT_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Fp8Format:
    """Bit layout of an fp8 cache dtype, as the encoders need it."""

    dtype: torch.dtype
    mantissa_bits: int
    exponent_bias: int
    max_code: int  # magnitude byte of the largest finite value
    fmax: float  # the largest finite value (FMAX in SPEC.md)
    emax: int  # exponent of the largest binade (EMAX of the OCP MX rule)

    @property
    def min_normal_f32_exponent(self) -> int:
        """Biased float32 exponent of this format's smallest normal value."""
        return 127 + 1 - self.exponent_bias


FP8_FORMATS: dict[torch.dtype, Fp8Format] = {
    torch.float8_e4m3fn: Fp8Format(torch.float8_e4m3fn, 3, 7, 0x7E, 448.0, 8),
    torch.float8_e5m2: Fp8Format(torch.float8_e5m2, 2, 15, 0x7B, 57344.0, 15),
}


E4M3_FMAX = FP8_FORMATS[torch.float8_e4m3fn].fmax
"""448: the largest finite e4m3fn value, the divisor of every e4m3fn scale (vLLM's kernels use it too)."""


def num_groups(d: int) -> int:
    """G = ceil(d / 128)."""
    return (d + GROUP_SIZE - 1) // GROUP_SIZE
