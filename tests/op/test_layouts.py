"""The packed-block layout (vllm-ascend's A5 DeepSeek-V4 indexer cache): recognising it, refusing what is not
it with the argument named, and writing it byte-exactly -- golden vectors included."""

from __future__ import annotations

import pytest
import torch

from helpers import GOLDEN_FILES, load_golden, random_x
from vllm_indexer_epilog.op.geometry import block_buffer, packed_geometry, scales_after_values
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog
from vllm_indexer_epilog.op.spec import SCALE_DTYPE_BY_MODE, num_groups


def packed(nb: int, bs: int, d: int, cache_dtype: torch.dtype, scale_dtype: torch.dtype, pad: int = 0, seed: int = 0):
    """Random-byte pages of [bs*d values][bs*G scales][pad], and the two views vllm-ascend makes of them."""
    g = num_groups(d)
    ssize = torch.empty((), dtype=scale_dtype).element_size()
    page = bs * d + bs * g * ssize + pad
    page += -page % ssize
    raw = torch.randint(0, 256, (nb * page,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    values = torch.as_strided(raw.view(cache_dtype), (nb, bs, 1, d), (page, d, d, 1), 0)
    scales = torch.as_strided(raw.view(scale_dtype), (nb, bs, 1, g), (page // ssize, g, g, 1), bs * d // ssize)
    return raw, values, scales, page


def expected(raw, values, scales, x, slots, quant_mode, round_scale):
    nb, bs, _, d = values.shape
    g = scales.shape[-1]
    rv, rs = values.reshape(nb * bs, d).clone(), scales.reshape(nb * bs, g).clone()
    reference_indexer_compress_epilog(rv, rs, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    want = raw.clone()
    pages = want.view(nb, -1)
    pages[:, : bs * d] = rv.view(torch.uint8).view(nb, -1)
    sb = rs.view(torch.uint8).reshape(nb, -1)
    pages[:, bs * d : bs * d + sb.shape[1]] = sb
    return want


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_vectors_through_packed_blocks(path) -> None:
    """Each golden call, with its cache rows laid into packed blocks: the rows come out as the golden says."""
    z = load_golden(path)
    n, d = z["cache"].reshape(-1, z["x"].shape[-1]).shape
    bs = next(b for b in (16, 8, 4, 2, 1) if n % b == 0)
    raw, values, scales, _ = packed(n // bs, bs, d, z["cache"].dtype, z["scale"].dtype, pad=12)
    values.copy_(z["cache"].reshape(n // bs, bs, 1, d))
    scales.copy_(z["scale"].reshape(n // bs, bs, 1, -1))
    before = raw.clone()
    reference_indexer_compress_epilog(values, scales, z["x"], z["slot_mapping"], quant_mode=z["quant_mode"],
                                      round_scale=z["round_scale"], packed=True)
    assert (values.reshape(n, d).contiguous().view(torch.uint8).numpy().reshape(-1) == z["cache_out"].reshape(-1)).all()
    assert (scales.reshape(n, -1).contiguous().view(torch.uint8).numpy().reshape(-1) == z["scale_out"].reshape(-1)).all()
    # Bytes outside the two views (the padding after each block) are never touched.
    inside = torch.zeros_like(raw)
    for t in (values, scales):
        as_int, ones = {1: (torch.uint8, 255), 4: (torch.int32, -1)}[t.element_size()]
        torch.as_strided(inside.view(as_int), t.shape, t.stride(), t.storage_offset()).fill_(ones)
    outside = inside == 0
    assert outside.any() and torch.equal(raw[outside], before[outside])


@pytest.mark.parametrize("quant_mode", [0, 1])
@pytest.mark.parametrize("d", [128, 200, 384])
def test_random_packed_writes_match_contiguous(quant_mode, d) -> None:
    raw, values, scales, _ = packed(4, 8, d, torch.float8_e4m3fn, SCALE_DTYPE_BY_MODE[quant_mode], pad=20, seed=d)
    x = random_x(25, d, torch.bfloat16, d, specials=9)
    slots = torch.randperm(32)[:25]
    slots[::3] = -1
    want = expected(raw, values, scales, x, slots, quant_mode, False)
    reference_indexer_compress_epilog(values, scales, x, slots, quant_mode=quant_mode, round_scale=False, packed=True)
    assert torch.equal(raw, want)


def test_geometry_and_derived_views() -> None:
    raw, values, scales, page = packed(3, 16, 128, torch.float8_e4m3fn, torch.float32, pad=64)
    geo = packed_geometry(values, scales)
    assert (geo.num_blocks, geo.block_size, geo.dim, geo.groups, geo.block_bytes, geo.rows) == (3, 16, 128, 1, page, 48)
    derived = scales_after_values(values, 1, torch.float32)
    assert derived.shape == scales.shape and derived.stride() == scales.stride()
    assert derived.data_ptr() == scales.data_ptr()
    buf = block_buffer(values, geo, 4)
    assert buf.dtype == torch.uint8 and buf.shape == (3, 16, 1, 132) and buf.stride(0) == page
    assert buf.data_ptr() == values.data_ptr()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda v, s, raw: (v, s.clone()), "one packed block buffer"),
        (lambda v, s, raw: (v, torch.as_strided(raw.view(torch.float32), s.shape, s.stride(), s.storage_offset() - 1)),
         "right after each block's values"),
        (lambda v, s, raw: (v, torch.as_strided(raw.view(torch.float32), s.shape, (s.stride(0) - 1, *s.stride()[1:]),
                                                s.storage_offset())), "block stride"),
        (lambda v, s, raw: (v.transpose(1, 3), s), "indexer_compress_cache"),
        (lambda v, s, raw: (v, s[:2]), "block count"),
        (lambda v, s, raw: (v[0, 0, 0], s), "num_blocks, block_size"),
    ],
)
def test_not_a_packed_pair_is_refused_before_writing(mutate, match) -> None:
    raw, values, scales, _ = packed(3, 16, 128, torch.float8_e4m3fn, torch.float32)
    v, s = mutate(values, scales, raw)
    before = raw.clone()
    with pytest.raises(ValueError, match=match):
        reference_indexer_compress_epilog(v, s, random_x(4, 128, torch.bfloat16, 0), torch.arange(4), packed=True)
    assert torch.equal(raw, before)
