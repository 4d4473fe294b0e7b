"""The compat compressor ops against per-token references written from vLLM's compressor.cpp."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from compat_op_checks import real_op, scratch_library  # noqa: E402
from vllm_indexer_epilog.integrations.dsv4_indexer_cpu.rows import compress_indexer_rows  # noqa: E402
from vllm_indexer_epilog.op.reference import ceil_log2  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat import ops_compressor as oc  # noqa: E402

F32, F64 = np.float32, np.float64


# ------------------------------------------------------------------ scalar references from the C++


def _fma(a, b, c):
    # float32 fma: exact float64 product, one float64 rounding, then float32 (differs only at ~2^-29 ties).
    return (np.asarray(a, F64) * np.asarray(b, F64) + np.asarray(c, F64)).astype(F32)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, F32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return (_bf16_bits(x).astype(np.uint32) << 16).view(F32)


def _c10_fp8(f: float) -> int:
    # at::Float8_e4m3fn(float): the kernel's subnormal patch.
    bits = int(np.array([f], F32).view(np.uint32)[0])
    sign = bits & 0x80000000
    bits ^= sign
    if bits >= (1087 << 20):
        res = 0x7F
    elif bits < (121 << 23):
        denorm = np.array([141 << 23], np.uint32).view(F32)[0]
        s = np.array([np.array([bits], np.uint32).view(F32)[0] + denorm], F32)
        res = (int(s.view(np.uint32)[0]) - (141 << 23)) & 0xFF
    else:
        mant_odd = (bits >> 20) & 1
        bits = (bits + ((7 - 127) << 23) + 0x7FFFF + mant_odd) & 0xFFFFFFFF
        res = (bits >> 20) & 0xFF
    return res | (sign >> 24)


def _fp8_bytes_ref(scaled: np.ndarray) -> np.ndarray:
    """cvt_fp32x16_to_fp8x16 (bit RNE, flush below 2^-6) then the scalar subnormal patch."""
    out = np.empty(scaled.shape, np.uint8)
    for i, v in enumerate(np.asarray(scaled, F32)):
        bits = int(np.array([v], F32).view(np.uint32)[0])
        sign = (bits & 0x80000000) >> 24
        a = bits & 0x7FFFFFFF
        e32, mant = a >> 23, a & 0x7FFFFF
        e8, m3 = e32 - 120, mant >> 20
        rnd = (mant >> 19) & 1
        if rnd and ((mant & 0x7FFFF) != 0 or (m3 & 1)):
            m3 += 1
        if m3 == 8:
            m3, e8 = 0, e8 + 1
        e8 = min(e8, 15)
        r = 0 if e32 < 121 else ((e8 << 3) | m3) & 0xFF
        out[i] = r | sign
        av = abs(float(v))
        if av != 0.0 and av < 2.0**-6:
            out[i] = _c10_fp8(float(v))
    return out


def _tree16(lanes: np.ndarray) -> F32:
    for half in (8, 4, 2, 1):
        lanes = (lanes[:half] + lanes[half : 2 * half]).astype(F32)
    return lanes[0]


def _pool_norm_ref(state, gslots, weight, eps, hd, ratio) -> np.ndarray:
    bs, sw = state.shape[1], state.shape[2] // 2
    mx = np.full(hd, -np.inf, F32)
    for w, s in enumerate(gslots):
        if s < 0:
            continue
        off = hd if w >= ratio else 0
        mx = np.maximum(mx, state[s // bs, s % bs, sw + off : sw + off + hd])
    denom, acc = np.zeros(hd, F32), np.zeros(hd, F32)
    for w, s in enumerate(gslots):
        if s < 0:
            continue
        off = hd if w >= ratio else 0
        row = state[s // bs, s % bs]
        # torch.exp: the same SIMD exp the op uses, so the reference isolates order/rounding.
        e = torch.exp(torch.from_numpy((row[sw + off : sw + off + hd] - mx).astype(F32))).numpy()
        denom = (denom + e).astype(F32)
        acc = _fma(e, row[off : off + hd], acc)
    v = (acc / denom).astype(F32)
    lanes = np.zeros(16, F32)
    for c in range(hd // 16):
        lanes = _fma(v[c * 16 : c * 16 + 16], v[c * 16 : c * 16 + 16], lanes)
    sq = _tree16(lanes)
    inv = F32(1.0) / np.sqrt(F32(sq / F32(hd)) + F32(eps))
    return ((v * F32(inv)).astype(F32) * weight).astype(F32)


def _rope_ref(x: np.ndarray, cs_row: np.ndarray) -> np.ndarray:
    out = x.copy()
    for i in range(32):
        c, s = cs_row[i], cs_row[32 + i]
        out[2 * i] = _fma(x[2 * i], c, F32(x[2 * i + 1] * -s))
        out[2 * i + 1] = _fma(x[2 * i + 1], c, F32(x[2 * i] * s))
    return out


def _compress_ref(state, gslots, pos, kv_slots, weight, eps, cs, cache, cbs, ratio, indexer: bool) -> None:
    """Per-token loop over compressor.cpp's two store kernels, writing into numpy `cache` [blocks, bytes]."""
    hd = 128 if indexer else 512
    for t in range(len(pos)):
        if (pos[t] + 1) % ratio != 0 or kv_slots[t] < 0:
            continue
        normed = _pool_norm_ref(state, gslots[t], weight, eps, hd, ratio)
        cpos = (pos[t] // ratio) * ratio
        blk, off = kv_slots[t] // cbs, kv_slots[t] % cbs
        if indexer:
            normed[64:] = _rope_ref(normed[64:], cs[cpos])
            q = _bf16_round(normed)
            amax = max(float(np.abs(q).max()), float(F32(1e-4)))
            e = math.ceil(math.log2(float(F32(F32(amax) / F32(448.0)))))
            scaled = np.clip(q * F32(2.0**-e), -448, 448).astype(F32)
            cache[blk, off * 128 : off * 128 + 128] = _fp8_bytes_ref(scaled)
            cache[blk, cbs * 128 + off * 4 : cbs * 128 + off * 4 + 4] = np.array([2.0**e], F32).view(np.uint8)
        else:
            nope = _bf16_round(normed[:448])
            rope = _rope_ref(normed[448:], cs[cpos])
            base = off * 576
            sbase = cbs * 576 + off * 8
            for tile in range(7):
                x = nope[tile * 64 : tile * 64 + 64]
                scale = max(float(F32(F32(np.abs(x).max()) / F32(448.0))), float(F32(1e-4)))
                e = math.ceil(math.log2(scale))
                scaled = np.clip(x * F32(2.0**-e), -448, 448).astype(F32)
                cache[blk, base + tile * 64 : base + tile * 64 + 64] = _fp8_bytes_ref(scaled)
                cache[blk, sbase + tile] = e + 127
            cache[blk, sbase + 7] = 0
            cache[blk, base + 448 : base + 576] = _bf16_bits(rope).view(np.uint8)


# ------------------------------------------------------------------ inputs


def _strided_state(num_blocks, block_size, row, gen, pad=16):
    # The state cache shares pages with the KV cache, so its block stride exceeds block_size * row.
    buf = torch.randn(num_blocks, block_size * row + pad, generator=gen)
    return buf, buf.as_strided((num_blocks, block_size, row), (block_size * row + pad, row, 1))


def _case(indexer: bool, ratio: int, overlap: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hd = 128 if indexer else 512
    coff = 2 if overlap else 1
    sw = coff * hd
    window = coff * ratio
    t = 4 * ratio + 3
    nb_state, bs_state = 12, 8
    buf, state = _strided_state(nb_state, bs_state, 2 * sw, gen)
    # Score spread gives a non-trivial softmax.
    state[..., sw:] *= 3.0
    state_slot_of_pos = torch.randperm(nb_state * bs_state, generator=gen)[:t]
    pos = torch.arange(t)
    win = pos[:, None] - window + 1 + torch.arange(window)
    gslots = torch.where(win >= 0, state_slot_of_pos[win.clamp_min(0)], torch.tensor(-1))
    cbs, cblocks = 4, 10
    kv_slots = torch.randperm(cbs * cblocks, generator=gen)[:t].clone()
    boundary = (pos + 1) % ratio == 0
    kv_slots[torch.nonzero(boundary).reshape(-1)[1]] = -1  # one skipped boundary token
    weight = (1.0 + 0.1 * torch.randn(hd, generator=gen)).float()
    ang = torch.rand(t + 8, 32, generator=gen) * 6.3
    cs = torch.cat((ang.cos(), ang.sin()), dim=1).float().contiguous()
    page = cbs * (hd + 4) if indexer else cbs * (576 + 8)
    cache_buf = torch.randint(0, 256, (cblocks, page + 40), dtype=torch.uint8, generator=gen)
    return state, gslots, pos, kv_slots, weight, cs, cache_buf, page, cbs, boundary


@pytest.mark.parametrize("indexer", [False, True], ids=["main512", "indexer128"])
@pytest.mark.parametrize("ratio,overlap", [(4, True), (8, False)])
def test_compress_store_bytes(indexer: bool, ratio: int, overlap: bool) -> None:
    state, gslots, pos, kv_slots, weight, cs, cache_buf, page, cbs, boundary = _case(indexer, ratio, overlap)
    expected = cache_buf.numpy().copy()
    _compress_ref(
        state.numpy(), gslots.numpy(), pos.numpy(), kv_slots.numpy(), weight.numpy(), 1e-6, cs.numpy(),
        expected, cbs, ratio, indexer,
    )
    kv_cache_2d = cache_buf[:, :page]  # strided: pages are followed by bytes the op must not touch
    fn = oc.compress_norm_rope_store_indexer if indexer else oc.compress_norm_rope_store
    fn(state, gslots, pos, kv_slots, weight, 1e-6, cs, kv_cache_2d, cbs, ratio)
    got = cache_buf.numpy()
    # Byte-exact everywhere: written rows, and untouched poison for -1 / non-boundary slots and padding.
    mismatch = np.nonzero(got != expected)
    assert mismatch[0].size == 0, f"{mismatch[0].size} bytes differ, first at {mismatch[0][:5]}, {mismatch[1][:5]}"
    written = int((boundary & (kv_slots >= 0)).sum())
    assert written >= 3


def test_nonboundary_and_negative_slots_untouched() -> None:
    state, gslots, pos, kv_slots, weight, cs, cache_buf, page, cbs, boundary = _case(True, 4, True, seed=3)
    kv_slots = torch.where(boundary, torch.tensor(-1), kv_slots)  # nothing is written
    before = cache_buf.clone()
    oc.compress_norm_rope_store_indexer(state, gslots, pos, kv_slots, weight, 1e-6, cs, cache_buf[:, :page], cbs, 4)
    assert torch.equal(before, cache_buf)


def test_fp8_conversion_matches_kernel_bits() -> None:
    # Every float32 region the kernel can see after the clamp: normals, subnormal-range values, ±0, ±448.
    gen = torch.Generator().manual_seed(1)
    x = torch.cat(
        (
            torch.randn(4000, generator=gen) * 100,
            torch.randn(4000, generator=gen) * 2.0**-7,
            torch.randn(2000, generator=gen) * 2.0**-10,
            torch.tensor([0.0, -0.0, 448.0, -448.0, 447.99, 2.0**-6, -(2.0**-6), 2.0**-9, 2.0**-10, 3 * 2.0**-11]),
        )
    ).clamp(-448, 448)
    assert np.array_equal(oc._to_fp8_bytes(x).numpy(), _fp8_bytes_ref(x.numpy()))


def test_ceil_log2_exact() -> None:
    x = torch.tensor([2.0**-20, 2.0**-20 * 1.0000001, 0.75, 1.0, 1.5, 448.0 / 448.0, 3.0e-7, 1e-4], dtype=torch.float32)
    expected = [math.ceil(math.log2(float(v))) for v in x]
    assert ceil_log2(x).tolist() == expected


def test_compress_indexer_rows_is_the_stored_value() -> None:
    # The split API: rows returned by compress_indexer_rows dequantize back from what the op stored.
    state, gslots, pos, kv_slots, weight, cs, cache_buf, page, cbs, boundary = _case(True, 4, True, seed=5)
    rows = compress_indexer_rows(state, gslots, pos, kv_slots, weight, 1e-6, cs, 4)
    assert rows.rows.dtype == torch.bfloat16 and rows.rows.shape[1] == 128
    assert torch.equal(rows.token_idx, torch.nonzero(boundary & (kv_slots >= 0)).reshape(-1))
    kv = cache_buf[:, :page]
    oc.store_indexer_rows(rows, kv, cbs)
    blk, off = rows.kv_slots // cbs, rows.kv_slots % cbs
    for i in range(len(blk)):
        q = kv[blk[i], off[i] * 128 : off[i] * 128 + 128].view(torch.float8_e4m3fn).float()
        s = kv[blk[i], cbs * 128 + off[i] * 4 : cbs * 128 + off[i] * 4 + 4].view(torch.float32)
        # fp8 e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the block's power-of-two range.
        torch.testing.assert_close(q * s, rows.rows[i].float(), atol=float(s) * 16, rtol=2.0**-4)


def test_save_partial_states() -> None:
    gen = torch.Generator().manual_seed(2)
    t, sw, ratio = 13, 256, 4
    kv_score = torch.randn(t, 2 * sw + 32, generator=gen)  # column-split views of a fused projection
    kv, score = kv_score[:, :sw], kv_score[:, sw : 2 * sw]
    ape = torch.randn(ratio, sw, generator=gen)
    pos = torch.arange(100, 100 + t)
    buf, state = _strided_state(5, 4, 2 * sw, gen)
    slots = torch.randperm(20, generator=gen)[:t].clone()
    slots[[2, 7]] = -1
    expected = buf.clone()
    exp_state = expected.as_strided(state.shape, state.stride())
    for i in range(t):
        s = int(slots[i])
        if s < 0:
            continue
        exp_state[s // 4, s % 4, :sw] = kv[i]
        exp_state[s // 4, s % 4, sw:] = score[i] + ape[int(pos[i]) % ratio]
    oc.save_partial_states(kv, score, ape, pos, state, slots)
    # Float adds of identical float32 operands: exact.
    assert torch.equal(buf, expected)


def test_fake_and_schema_on_scratch_namespace() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    lib = scratch_library(oc.OPS)  # noqa: F841  (alive while the test runs)
    state, gslots, pos, kv_slots, weight, cs, cache_buf, page, cbs, _ = _case(True, 4, True)
    kv = cache_buf[:, :page]
    before = cache_buf.clone()
    torch.ops.vie_test_cmp.compress_norm_rope_store_indexer_cpu(state, gslots, pos, kv_slots, weight, 1e-6, cs, kv, cbs, 4)
    assert not torch.equal(before, cache_buf)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) for a in (state, gslots, pos, kv_slots, weight)]
        torch.ops.vie_test_cmp.compress_norm_rope_store_indexer_cpu(
            *args, 1e-6, mode.from_tensor(cs), mode.from_tensor(kv), cbs, 4
        )
        torch.ops.vie_test_cmp.save_partial_states_cpu(
            *(mode.from_tensor(torch.zeros(2, 8)) for _ in range(2)), mode.from_tensor(torch.zeros(4, 8)),
            mode.from_tensor(torch.zeros(2, dtype=torch.long)), mode.from_tensor(torch.zeros(2, 4, 16)),
            mode.from_tensor(torch.zeros(2, dtype=torch.long)),
        )
    schema = torch.ops.vie_test_cmp.compress_norm_rope_store_cpu.default._schema
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == ["kv_cache_2d"]


@pytest.mark.parametrize("indexer", [False, True], ids=["main512", "indexer128"])
def test_against_vllm_real_op(indexer: bool) -> None:
    name = "compress_norm_rope_store_indexer_cpu" if indexer else "compress_norm_rope_store_cpu"
    real = real_op(name)
    state, gslots, pos, kv_slots, weight, cs, cache_buf, page, cbs, _ = _case(indexer, 4, True, seed=9)
    ours_buf = cache_buf.clone()
    real(state, gslots, pos, kv_slots, weight, 1e-6, cs, cache_buf[:, :page], cbs, 4)
    fn = oc.compress_norm_rope_store_indexer if indexer else oc.compress_norm_rope_store
    fn(state, gslots, pos, kv_slots, weight, 1e-6, cs, ours_buf[:, :page], cbs, 4)
    # The kernel's SIMD exp/FMA contraction may differ from ours in the last float32 bit, which can move
    # a rare bf16/fp8 rounding; demand near-total byte agreement rather than all of it.
    diff = (ours_buf != cache_buf).sum().item()
    assert diff <= max(4, cache_buf.numel() // 2000), diff
    save = real_op("save_partial_states_cpu")
    gen = torch.Generator().manual_seed(4)
    kv, score, ape = torch.randn(6, 256, generator=gen), torch.randn(6, 256, generator=gen), torch.randn(4, 256, generator=gen)
    p, slots = torch.arange(6), torch.tensor([0, 3, -1, 5, 7, 2])
    a, b = torch.zeros(2, 4, 512), torch.zeros(2, 4, 512)
    save(kv, score, ape, p, a, slots)
    oc.save_partial_states(kv, score, ape, p, b, slots)
    assert torch.equal(a, b)
