"""The packed-block cache layout: the one paged layout the op writes besides its own contiguous pair.

vllm-ascend's DeepSeek-V4 indexer cache on Ascend 950 (A5) keeps values and scales in one page per
block: `[block_size * d FP8 value bytes][block_size * G scales]`, blocks `block_bytes` apart (the page
may be padded). It hands out two strided views of that page, values `[nb, bs, (1,) d]` and scales
`[nb, bs, (1,) G]`, and a third, uint8 `[nb, bs, 1, d + G * scale_bytes]`, that its fused Ascend C writer
(`_C_ascend.indexer_compress_epilog_v2`) addresses by block. This module recognises such a pair,
rebuilds the third view from it, and gives the reference `[nb, bs, width]` views to scatter into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedGeometry:
    """Sizes of a cache in blocks; rows are numbered block-major: slot = block * block_size + offset.

    A packed pair has its real block stride; a contiguous pair is one block of N rows (block_bytes 0).
    """

    num_blocks: int
    block_size: int
    dim: int
    groups: int
    block_bytes: int

    @property
    def rows(self) -> int:
        return self.num_blocks * self.block_size


def _byte_offset(t: torch.Tensor) -> int:
    return t.storage_offset() * t.element_size()


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return bool(is_fake(t))


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` may be views of one buffer, from metadata only.

    Real tensors compare their storages' data pointers (two storages can wrap one allocation). Fake tensors
    (FakeTensorMode, torch.compile) have no data pointer, and functionalization may hand the fake kernel
    separate copies of two aliased inputs, so for them the answer is yes: the real kernel checks at run time.
    Meta tensors compare their storage objects.
    """
    if _is_fake(a) or _is_fake(b):
        return True
    if a.untyped_storage()._cdata == b.untyped_storage()._cdata:
        return True
    if a.device.type == "meta" or b.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def packed_geometry(values: torch.Tensor, scales: torch.Tensor) -> PackedGeometry:
    """The geometry of a values/scales pair laid out as packed blocks; ValueError naming the argument if not.

    Accepted: each block's rows contiguous in both views, both views in one storage with one block stride,
    and each block's scales starting right after its values (the layout vLLM-Ascend allocates).
    """
    if values.dim() < 2 or scales.dim() < 2:
        raise ValueError(
            "a packed indexer cache needs indexer_compress_cache [num_blocks, block_size, (1,) d] and "
            f"indexer_compress_scale [num_blocks, block_size, (1,) G], got {tuple(values.shape)} and {tuple(scales.shape)}"
        )
    nb, d, g = values.shape[0], values.shape[-1], scales.shape[-1]
    if d < 1 or g < 1:
        raise ValueError(f"packed cache views need d >= 1 and G >= 1, got {tuple(values.shape)} and {tuple(scales.shape)}")
    bs = values[0].numel() // d if nb else values.shape[1]
    if scales.shape[0] != nb or (nb and scales[0].numel() // g != bs):
        raise ValueError(
            f"indexer_compress_scale {tuple(scales.shape)} must have the block count and block size of "
            f"indexer_compress_cache {tuple(values.shape)}"
        )
    if nb == 0:
        return PackedGeometry(0, bs, d, g, 0)
    for name, t in (("indexer_compress_cache", values), ("indexer_compress_scale", scales)):
        if not t[0].is_contiguous():
            raise ValueError(f"{name}: the rows of one block must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    if not same_storage(values, scales):
        raise ValueError("indexer_compress_cache and indexer_compress_scale must be views of one packed block buffer")
    block_bytes = values.stride(0) * values.element_size()
    value_bytes = bs * d * values.element_size()
    scale_bytes = bs * g * scales.element_size()
    if nb > 1 and scales.stride(0) * scales.element_size() != block_bytes:
        raise ValueError(
            f"indexer_compress_scale block stride ({scales.stride(0) * scales.element_size()} bytes) must equal "
            f"indexer_compress_cache's ({block_bytes} bytes)"
        )
    if _byte_offset(scales) - _byte_offset(values) != value_bytes:
        raise ValueError(
            "indexer_compress_scale must start right after each block's values "
            f"({value_bytes} bytes in), got {_byte_offset(scales) - _byte_offset(values)}"
        )
    if nb > 1 and block_bytes < value_bytes + scale_bytes:
        raise ValueError(f"packed blocks overlap: block stride {block_bytes} bytes < {value_bytes + scale_bytes} bytes per block")
    return PackedGeometry(nb, bs, d, g, block_bytes if nb > 1 else value_bytes + scale_bytes)


def block_rows(t: torch.Tensor, geometry: PackedGeometry, width: int) -> torch.Tensor:
    """`t` (a view of a packed pair) as `[num_blocks, block_size, width]`, with no copy."""
    return t.view(geometry.num_blocks, geometry.block_size, width)


def _view_of_storage(
    like: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], stride: tuple[int, ...], byte_offset: int
) -> torch.Tensor:
    """A `dtype` view of `like`'s storage; offset and strides in elements of `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if byte_offset % itemsize:
        raise ValueError(f"a {dtype} view cannot start at byte {byte_offset}: it is not {itemsize}-byte aligned")
    return torch.empty(0, dtype=dtype, device=like.device).set_(
        like.untyped_storage(), byte_offset // itemsize, shape, stride
    )


def scales_after_values(values: torch.Tensor, groups: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """The scales view `[nb, bs, (1,) G]` of the packed blocks whose values view is `values` ([nb, bs, (1,) d]).

    vllm-ascend's split-stream writer (`indexer_quant_scatter_part1`) is handed the values and whole-block
    views only; the scales sit at a fixed place in each block, so they are derived here.
    """
    nb, d = values.shape[0], values.shape[-1]
    bs = values[0].numel() // d if nb else values.shape[1]
    itemsize = torch.empty((), dtype=scale_dtype).element_size()
    block_bytes = values.stride(0) * values.element_size()
    if block_bytes % itemsize:
        raise ValueError(f"packed blocks of {block_bytes} bytes cannot hold aligned {scale_dtype} scales")
    shape = (*values.shape[:-1], groups)
    inner = torch.empty(shape[1:], device="meta").stride()
    start = _byte_offset(values) + bs * d * values.element_size()
    return _view_of_storage(values, scale_dtype, shape, (block_bytes // itemsize, *inner), start)


def block_buffer(values: torch.Tensor, geometry: PackedGeometry, scale_itemsize: int) -> torch.Tensor:
    """The uint8 whole-block view `[nb, bs, 1, d + G * scale_itemsize]`, stride(0) = the block stride, that
    `_C_ascend.indexer_compress_epilog_v2` takes: it reads only the block count, block size, row width and
    block stride, and finds each block's scales after its `bs * d` value bytes."""
    row_bytes = geometry.dim + geometry.groups * scale_itemsize
    return _view_of_storage(
        values,
        torch.uint8,
        (geometry.num_blocks, geometry.block_size, 1, row_bytes),
        (geometry.block_bytes, row_bytes, row_bytes, 1),
        _byte_offset(values),
    )
