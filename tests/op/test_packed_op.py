"""The op itself on a packed-block pair (op/geometry.py): vLLM's DeepSeek-V4 CPU indexer pages and
vllm-ascend's A5 pages are two strided views of one buffer, values `[nb, bs, (1,) d]` then scales
`[nb, bs, (1,) G]` in each block, blocks a stride apart (the bytes between blocks belong to someone else).

`torch.ops.custom.indexer_compress_epilog` must write exactly what the reference writes in its packed mode and
not one byte outside the two views; a pair that is not a packed pair is refused by the op and the reference
alike (same class, same argument named), before anything is written; tracing (fake/meta tensors) works."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from helpers import BACKENDS, CACHE_DTYPES, GOLDEN_FILES, MODES, X_DTYPES, load_golden, random_x
from vllm_indexer_epilog.op.geometry import packed_geometry
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog
from vllm_indexer_epilog.op.spec import SCALE_DTYPE_BY_MODE, num_groups
from vllm_indexer_epilog.op.validation import validate_epilog_args

OP = torch.ops.custom.indexer_compress_epilog
ARG_NAMES = ("indexer_compress_cache", "indexer_compress_scale", "x", "slot_mapping")


def pages(nb: int, bs: int, d: int, cache_dtype: torch.dtype, scale_dtype: torch.dtype, *, pad: int = 0,
          lead: int = 0, seed: int = 0, unit_dim: bool = True):
    """Random bytes: `lead` bytes, then nb pages of [bs*d values][bs*G scales][pad] (the pad stands for vLLM's
    compressor state sharing the page). Returns the buffer and the two views."""
    g = num_groups(d)
    ssize = torch.empty((), dtype=scale_dtype).element_size()
    page = bs * d + bs * g * ssize + pad
    assert page % ssize == 0 and lead % ssize == 0 and (bs * d) % ssize == 0
    raw = torch.randint(0, 256, (lead + nb * page + 24,), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.uint8)
    mid = (1,) if unit_dim else ()
    values = torch.as_strided(raw.view(cache_dtype), (nb, bs, *mid, d), (page, d, *((d,) if unit_dim else ()), 1),
                              lead)
    scales = torch.as_strided(raw.view(scale_dtype), (nb, bs, *mid, g),
                              (page // ssize, g, *((g,) if unit_dim else ()), 1), (lead + bs * d) // ssize)
    return raw, values, scales


def expected(raw, values, scales, x, slots, quant_mode, round_scale):
    """The reference in its explicit packed mode, on a copy of the whole buffer."""
    want = raw.clone()
    v = torch.as_strided(want.view(values.dtype), values.shape, values.stride(), values.storage_offset())
    s = torch.as_strided(want.view(scales.dtype), scales.shape, scales.stride(), scales.storage_offset())
    reference_indexer_compress_epilog(v, s, x, slots, quant_mode=quant_mode, round_scale=round_scale, packed=True)
    return want


def slots_with_skips_and_duplicates(t: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randperm(n, generator=g)[:t].to(dtype)
    s[:: 4] = -1
    if t > 6:
        s[5] = s[1]  # a later row names the slot of an earlier one: the later wins
        s[t - 1] = s[2]
    return s


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_op_on_packed_views_matches_reference(mode, cache_dtype, x_dtype, slot_dtype) -> None:
    quant_mode, round_scale = mode
    nb, bs, d = 5, 8, 128
    raw, values, scales = pages(nb, bs, d, cache_dtype, SCALE_DTYPE_BY_MODE[quant_mode], pad=36, lead=20, seed=7)
    x = random_x(30, d, x_dtype, seed=11, specials=12)
    slots = slots_with_skips_and_duplicates(30, nb * bs, slot_dtype, seed=3)
    want = expected(raw, values, scales, x, slots, quant_mode, round_scale)
    OP(values, scales, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    assert torch.equal(raw, want)


@pytest.mark.parametrize("quant_mode", [0, 1])
@pytest.mark.parametrize(
    ("nb", "bs", "d", "pad", "unit_dim"),
    [(3, 4, 200, 8, True), (2, 16, 384, 0, False), (1, 8, 128, 44, True), (7, 1, 128, 4, False), (4, 3, 4096, 12, True)],
)
def test_op_on_packed_views_shapes(quant_mode, nb, bs, d, pad, unit_dim) -> None:
    """Tail groups, several groups, one block, one row a block, no padding, no unit dimension."""
    raw, values, scales = pages(nb, bs, d, torch.float8_e4m3fn, SCALE_DTYPE_BY_MODE[quant_mode], pad=pad, lead=4,
                                seed=d + nb, unit_dim=unit_dim)
    n = nb * bs
    x = random_x(n + 2, d, torch.bfloat16, seed=d, specials=5)
    slots = torch.cat([torch.randperm(n), torch.tensor([-1, n - 1])])
    want = expected(raw, values, scales, x, slots, quant_mode, False)
    OP(values, scales, x, slots, quant_mode=quant_mode, round_scale=False)
    assert torch.equal(raw, want)


@pytest.mark.parametrize("pad", [0, 4], ids=["page_32_aligned", "page_misaligned"])
def test_large_write_streaming_stores(pad) -> None:
    """T * d >= 2^20: the kernel may use streaming stores, only when every row it writes is 32-byte aligned."""
    nb, bs, d = 160, 64, 128  # page 8448 bytes (a multiple of 32), or 8452 with pad 4
    raw, values, scales = pages(nb, bs, d, torch.float8_e4m3fn, torch.float32, pad=pad, seed=pad)
    n = nb * bs
    x = random_x(8300, d, torch.bfloat16, seed=5)
    slots = torch.randperm(n)[:8300]
    slots[::17] = -1
    want = expected(raw, values, scales, x, slots, 1, True)
    OP(values, scales, x, slots)
    assert torch.equal(raw, want)


def test_contiguous_pair_unchanged() -> None:
    """Both contiguous: the op's first layout, N rows as one block; the same bytes as before."""
    n, d = 40, 256
    g = torch.Generator().manual_seed(1)
    cache = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    scale = torch.randint(0, 256, (n, 8), generator=g, dtype=torch.uint8).view(torch.float32)
    x = random_x(12, d, torch.float16, seed=2)
    slots = torch.tensor([3, -1, 39, 0, 7, 3, 12, -1, 20, 21, 22, 7])
    wc, ws = cache.clone(), scale.clone()
    reference_indexer_compress_epilog(wc, ws, x, slots, packed=False)
    OP(cache, scale, x, slots)
    assert torch.equal(cache.view(torch.uint8), wc.view(torch.uint8))
    assert torch.equal(scale.view(torch.int32), ws.view(torch.int32))


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_vectors_through_packed_views(path) -> None:
    z = load_golden(path)
    n, d = z["cache"].reshape(-1, z["x"].shape[-1]).shape
    bs = next(b for b in (16, 8, 4, 2, 1) if n % b == 0)
    raw, values, scales = pages(n // bs, bs, d, z["cache"].dtype, z["scale"].dtype, pad=12, lead=8, seed=n)
    values.copy_(z["cache"].reshape(values.shape))
    scales.copy_(z["scale"].reshape(scales.shape))
    before = raw.clone()
    OP(values, scales, z["x"], z["slot_mapping"], quant_mode=z["quant_mode"], round_scale=z["round_scale"])
    assert (values.reshape(n, d).contiguous().view(torch.uint8).numpy().reshape(-1) == z["cache_out"].reshape(-1)).all()
    assert (scales.reshape(n, -1).contiguous().view(torch.uint8).numpy().reshape(-1) == z["scale_out"].reshape(-1)).all()
    inside = torch.zeros_like(raw, dtype=torch.bool)
    for t in (values, scales):
        start = t.storage_offset() * t.element_size()
        per_block = t[0].numel() * t.element_size()
        for b in range(t.shape[0]):
            o = start + b * t.stride(0) * t.element_size()
            inside[o : o + per_block] = True
    assert (~inside).any() and torch.equal(raw[~inside], before[~inside])


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("nb", [1, 3])
def test_triton_on_packed_views(mode, nb) -> None:
    fn, device = BACKENDS["triton"]
    quant_mode, round_scale = mode
    bs, d = 4, 200
    raw, values, scales = pages(nb, bs, d, torch.float8_e5m2, SCALE_DTYPE_BY_MODE[quant_mode], pad=16, lead=8,
                                seed=nb)
    n = nb * bs
    x = random_x(n + 2, d, torch.float16, seed=4, specials=4)
    slots = torch.cat([torch.randperm(n), torch.tensor([-1, -1])])  # no duplicates: on Triton the winner is unspecified
    want = expected(raw, values, scales, x, slots, quant_mode, round_scale)
    raw, values, scales = (t.to(device) for t in (raw, values, scales)) if device != "cpu" else (raw, values, scales)
    fn(values, scales, x.to(device), slots.to(device), quant_mode=quant_mode, round_scale=round_scale)
    assert torch.equal(raw.cpu(), want)


# ---- not a packed pair ---------------------------------------------------------------------------------

def _shifted(t: torch.Tensor, raw: torch.Tensor, *, offset: int = 0, stride0: int = 0) -> torch.Tensor:
    return torch.as_strided(raw.view(t.dtype), t.shape, (t.stride(0) + stride0, *t.stride()[1:]),
                            t.storage_offset() + offset)


INVALID = {
    "different_storages": lambda v, s, raw: (v, torch.as_strided(raw.clone().view(s.dtype), s.shape, s.stride(),
                                                                  s.storage_offset())),
    "scales_not_after_values": lambda v, s, raw: (v, _shifted(s, raw, offset=1)),
    "scales_before_values": lambda v, s, raw: (v, _shifted(s, raw, offset=-1)),
    "scale_block_stride_differs": lambda v, s, raw: (v, _shifted(s, raw, stride0=-1)),
    "value_block_stride_differs": lambda v, s, raw: (_shifted(v, raw, stride0=4), s),
    "blocks_overlap": lambda v, s, raw: (
        torch.as_strided(raw.view(v.dtype), v.shape, (v.shape[1] * v.shape[-1], *v.stride()[1:]), v.storage_offset()),
        torch.as_strided(raw.view(s.dtype), s.shape, (v.shape[1] * v.shape[-1] // 4, *s.stride()[1:]),
                         s.storage_offset())),
    "misaligned_page": lambda v, s, raw: (_shifted(v, raw, stride0=2), s),
    "rows_not_contiguous": lambda v, s, raw: (v.transpose(1, 3), s),
    "scale_rows_not_contiguous": lambda v, s, raw: (v, s.transpose(1, 3)),
    "block_count_differs": lambda v, s, raw: (v, s[:2]),
    "cache_1d": lambda v, s, raw: (v[0, 0, 0], s),
    "scale_contiguous_cache_strided": lambda v, s, raw: (v, s.contiguous()),
}


def _named_argument(exc: BaseException) -> str:
    msg = str(exc)
    hits = [(m.start(), name) for name in ARG_NAMES for m in re.finditer(rf"\b{name}\b", msg)]
    assert hits, f"no argument named in {msg!r}"
    return min(hits)[1]


def _refusal(fn) -> BaseException:
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_packed_pairs_refused_alike(case) -> None:
    raw, values, scales = pages(3, 16, 128, torch.float8_e4m3fn, torch.float32, pad=64, seed=9)
    v, s = INVALID[case](values, scales, raw)
    x = random_x(4, 128, torch.bfloat16, 0)
    slots = torch.arange(4)
    before = raw.clone()
    other = {id(t.untyped_storage()): t for t in (v, s)}
    snapshots = {k: bytes(t.untyped_storage()) for k, t in other.items()}
    want = _refusal(lambda: reference_indexer_compress_epilog(v, s, x, slots))
    got = _refusal(lambda: OP(v, s, x, slots))
    assert type(got) is type(want) is ValueError, f"op: {got!r}; reference: {want!r}"
    assert _named_argument(got) == _named_argument(want), f"op: {got}\nreference: {want}"
    assert "must be contiguous" in str(got) and "must be contiguous" in str(want)
    private = _refusal(lambda: torch.ops.vllm_indexer_epilog_cpu.quantize_scatter(v, s, x, slots, 1, True))
    assert type(private) is ValueError and _named_argument(private) == _named_argument(want)
    # The explicit packed mode refuses it too, with geometry.py's own reason.
    with pytest.raises(ValueError):
        reference_indexer_compress_epilog(v, s, x, slots, packed=True)
    assert torch.equal(raw, before)
    for k, t in other.items():
        assert bytes(t.untyped_storage()) == snapshots[k]


def test_contiguity_error_kept_for_plain_strided_tensors() -> None:
    """A strided tensor that is no packed view gets the old error, naming it."""
    cache = torch.zeros(8, 256, dtype=torch.uint8).view(torch.float8_e4m3fn)[:, ::2]
    scale = torch.zeros(8, 1)
    x = torch.ones(2, 128)
    for fn in (lambda: OP(cache, scale, x, torch.arange(2)),
               lambda: reference_indexer_compress_epilog(cache, scale, x, torch.arange(2))):
        with pytest.raises(ValueError, match=r"^indexer_compress_cache must be contiguous \(shape \(8, 128\)"):
            fn()


def test_validation_detects_layouts() -> None:
    raw, values, scales = pages(3, 16, 128, torch.float8_e4m3fn, torch.float32, pad=64)
    x = torch.ones(2, 128)
    p = validate_epilog_args(values, scales, x, torch.arange(2), 1, True)
    assert p.packed and p.geometry == packed_geometry(values, scales) and p.slots == 48
    q = validate_epilog_args(values.reshape(-1, 128).contiguous(), scales.reshape(-1, 1).contiguous(), x,
                             torch.arange(2), 1, True)
    assert not q.packed and q.slots == 48
    with pytest.raises(ValueError, match="indexer_compress_cache must be contiguous"):
        validate_epilog_args(values, scales, x, torch.arange(2), 1, True, packed=False)


# ---- tracing: fake and meta tensors ---------------------------------------------------------------------

def test_fake_tensor_mode_accepts_and_refuses_packed_pairs() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    raw, values, scales = pages(3, 16, 128, torch.float8_e4m3fn, torch.float32, pad=64)
    with FakeTensorMode() as mode:
        fraw = mode.from_tensor(raw)
        fv = torch.as_strided(fraw.view(values.dtype), values.shape, values.stride(), values.storage_offset())
        fs = torch.as_strided(fraw.view(scales.dtype), scales.shape, scales.stride(), scales.storage_offset())
        x = torch.empty(4, 128, dtype=torch.bfloat16)
        OP(fv, fs, x, torch.zeros(4, dtype=torch.int64))
        # Not after each block's values: refused while tracing too (storage identity is left to run time:
        # functionalization may give the fake kernel separate copies of aliased inputs).
        fs2 = torch.as_strided(fraw.view(scales.dtype), scales.shape, scales.stride(), scales.storage_offset() + 1)
        with pytest.raises(ValueError, match="indexer_compress_cache must be contiguous"):
            OP(fv, fs2, x, torch.zeros(4, dtype=torch.int64))


def test_meta_tensors_packed_pair() -> None:
    raw, values, scales = pages(3, 16, 128, torch.float8_e4m3fn, torch.float32, pad=64)
    mraw = raw.to("meta")
    mv = torch.as_strided(mraw.view(values.dtype), values.shape, values.stride(), values.storage_offset())
    ms = torch.as_strided(mraw.view(scales.dtype), scales.shape, scales.stride(), scales.storage_offset())
    x, slots = torch.empty(4, 128, device="meta"), torch.empty(4, dtype=torch.int64, device="meta")
    OP(mv, ms, x, slots)
    other = torch.as_strided(mraw.clone().view(scales.dtype), scales.shape, scales.stride(), scales.storage_offset())
    with pytest.raises(ValueError, match="indexer_compress_cache must be contiguous"):
        OP(mv, other, x, slots)


@pytest.mark.parametrize("backend", ["eager", "make_fx"])
def test_torch_compile_traces_packed_pair(backend) -> None:
    """Dynamo (fake-tensor propagation through the op's fake kernel) and make_fx in fake mode trace a packed
    pair. (AOTAutograd's functionalization, aot_eager/inductor, copies the fp8 and float32 views of the page
    buffer as two separate bases, so the real kernel would then see two buffers: a torch limitation for
    mutated views of different dtypes, not exercised here.)"""
    raw, values, scales = pages(3, 16, 128, torch.float8_e4m3fn, torch.float32, pad=64, seed=2)
    x = random_x(5, 128, torch.bfloat16, seed=3)
    slots = torch.tensor([0, 47, -1, 17, 30])
    want = expected(raw, values, scales, x, slots, 1, True)

    vmeta = (values.dtype, tuple(values.shape), values.stride(), values.storage_offset())
    smeta = (scales.dtype, tuple(scales.shape), scales.stride(), scales.storage_offset())

    def write(raw, x, slots):
        # The views are made inside the graph, as vLLM's integration does from its page buffer (AOTAutograd
        # does not take two graph inputs that alias with different dtypes).
        v = torch.as_strided(raw.view(vmeta[0]), vmeta[1], vmeta[2], vmeta[3])
        s = torch.as_strided(raw.view(smeta[0]), smeta[1], smeta[2], smeta[3])
        OP(v, s, x, slots)

    if backend == "make_fx":
        from torch.fx.experimental.proxy_tensor import make_fx

        graph = make_fx(write, tracing_mode="fake")(raw, x, slots)
        assert "indexer_compress_epilog" in graph.code
        graph(raw, x, slots)
    else:
        torch._dynamo.reset()
        torch.compile(write, backend=backend, fullgraph=True)(raw, x, slots)
    assert torch.equal(raw, want)


def test_vllm_cpu_page_views_are_written_by_the_op() -> None:
    """The vLLM CPU indexer cache writes its pages' two strided views through the op (no fallback): the op
    writes them exactly as the reference does (what the removed `op_writes_packed_views` probe checked)."""
    from vllm_indexer_epilog.integrations.dsv4_indexer_cpu import indexer_layout as lay

    layout = lay.IndexerLayout(torch.float8_e4m3fn, 0)
    bufs = [torch.zeros(3, 4 * layout.row_bytes + 40, dtype=torch.uint8) for _ in range(2)]
    x = torch.linspace(-3.0, 5.0, 2 * lay.HEAD_DIM).view(2, lay.HEAD_DIM).to(torch.bfloat16)
    slots = torch.tensor([9, -1], dtype=torch.int64)
    assert lay.write_rows(*lay.page_views(bufs[0], 4, layout), x, slots, layout) == "custom.indexer_compress_epilog"
    reference_indexer_compress_epilog(*lay.page_views(bufs[1], 4, layout), x, slots, quant_mode=0, round_scale=True,
                                      packed=True)
    assert torch.equal(bufs[0], bufs[1])


def test_nothing_outside_views_with_every_slot_written() -> None:
    """Every slot of every block written at once: all bytes between blocks (and before/after) unchanged."""
    nb, bs, d = 6, 8, 256
    raw, values, scales = pages(nb, bs, d, torch.float8_e5m2, torch.float8_e8m0fnu, pad=23, lead=3, seed=13)
    before = raw.clone()
    x = random_x(nb * bs, d, torch.float32, seed=1)
    OP(values, scales, x, torch.arange(nb * bs, dtype=torch.int32).flip(0), quant_mode=0, round_scale=True)
    page = bs * d + bs * 2 + 23
    changed = np.nonzero((raw != before).numpy())[0]
    rel = (changed - 3) % page
    assert changed.min() >= 3 and changed.max() < 3 + nb * page and (rel < bs * d + bs * 2).all()
