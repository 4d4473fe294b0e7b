"""Plain-torch stand-ins for the Triton kernels DeepSeek-V4's attention metadata builders launch.

vLLM's CPU platform disables stock Triton (it has no CPU backend), so `triton.jit` turns into a no-op
decorator and each of these launches fails. Each stand-in replaces the `__call__` of one JIT-warmup owner
class (`VllmTritonJitKernel` subclass): every instance, every module that imported the instance, and
every call site then computes the same integers in torch, vectorized over the kernel's grid. Each one
writes exactly the elements the Triton kernel writes (and no others) with the same values, including
its integer-division semantics (Triton divides ints like C: truncating). tests/integrations/vllm_cpu/
test_metadata.py checks each against a per-program loop transcribed from the Triton source.

During JIT warmup (`self._warming`) the kernels would only be compiled; the stand-ins do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

_I64 = torch.int64


def _tdiv(a: torch.Tensor, b: int | torch.Tensor) -> torch.Tensor:
    """Integer division truncating toward zero, as Triton (and C) divide."""
    return torch.div(a, b, rounding_mode="trunc")


def _tmod(a: torch.Tensor, b: int | torch.Tensor) -> torch.Tensor:
    """Remainder with the sign of the dividend, as Triton's `%` on ints."""
    return a - _tdiv(a, b) * b


def _segments(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments i of length lens[i] (negative counts as 0): (segment id, offset within it) per element."""
    lens = lens.clamp(min=0)
    seg = torch.repeat_interleave(torch.arange(lens.numel(), dtype=_I64, device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens
    off = torch.arange(seg.numel(), dtype=_I64, device=lens.device) - first[seg]
    return seg, off


# ---------------------------------------------------------------------------------------------------
# vllm/v1/attention/backends/mla/compressor_utils.py: CompressedSlotMappingKernel (grid: one program per
# request of block_table). Writes out[qs + i] for i < query_len of each request.
# ---------------------------------------------------------------------------------------------------
def compressed_slot_mapping(
    self: Any,
    compressed_slot_mapping: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    compress_ratio: int,
    dcp_world_size: int,
    cp_interleave: int,
) -> None:
    if getattr(self, "_warming", False):
        return None
    pad = -1
    num_reqs = block_table.shape[0]
    if num_reqs == 0:
        return None
    qsl = query_start_loc[: num_reqs + 1].to(_I64)
    qlen = qsl[1:] - qsl[:-1]
    req, off = _segments(qlen)
    if req.numel() == 0:
        return None
    tok = qsl[req] + off
    pos = seq_lens[:num_reqs].to(_I64)[req] - qlen[req] + off
    slot = slot_mapping[tok].to(_I64)
    valid = (_tmod(pos + 1, compress_ratio) == 0) & (slot != pad)
    span = cp_interleave * dcp_world_size
    local_pos = _tdiv(pos, span) * cp_interleave + _tmod(pos, cp_interleave)
    pac = _tdiv(local_pos, compress_ratio)
    col = torch.where(valid, _tdiv(pac, block_size), torch.zeros_like(pac))
    row = torch.where(valid, req, torch.zeros_like(req))
    blocks = block_table[row, col].to(_I64)
    ids = torch.where(valid, blocks * block_size + _tmod(pac, block_size), torch.full_like(pac, pad))
    compressed_slot_mapping[tok] = ids.to(compressed_slot_mapping.dtype)
    return None


def _token_rows(query_start_loc: torch.Tensor, token_to_req_indices: torch.Tensor, is_valid_token: torch.Tensor,
                token_offset: int, num_tokens: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """What both SWA-index kernels read per token: its index, whether it is valid, its request (0 for a padded
    token, so it reads nothing out of range), and that request's query start and length."""
    toks = torch.arange(token_offset, token_offset + num_tokens, dtype=_I64, device=dev)
    valid = is_valid_token[toks].to(torch.bool)
    req = token_to_req_indices[toks].to(_I64)
    req = torch.where(valid, req, torch.zeros_like(req))  # invalid rows read nothing
    qs = query_start_loc.to(_I64)[req]
    qlen = query_start_loc.to(_I64)[req + 1] - qs
    return toks, valid, req, qs, qlen


# ---------------------------------------------------------------------------------------------------
# vllm/v1/attention/backends/mla/sparse_swa.py: ComputeSWAIndicesAndLensKernel (grid: num_tokens programs;
# program p reads token p + token_offset, writes swa_lens[p] and index_width entries of row p of
# swa_indices, [T, W] or [T, 1, W]).
# ---------------------------------------------------------------------------------------------------

def swa_indices_and_lens(
    self: Any,
    swa_indices: torch.Tensor,
    swa_lens: torch.Tensor,
    window_size: int,
    index_width: int,
    left_visible: torch.Tensor,
    right_visible: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    token_to_req_indices: torch.Tensor,
    is_valid_token: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    replay_start: torch.Tensor,
    *,
    num_tokens: int,
    token_offset: int,
    has_image: bool = False,
) -> None:
    if getattr(self, "_warming", False) or num_tokens <= 0:
        return None
    dev = swa_indices.device
    toks, valid, req, qs, qlen = _token_rows(query_start_loc, token_to_req_indices, is_valid_token, token_offset,
                                             num_tokens, dev)
    pos = seq_lens.to(_I64)[req] - qlen + toks - qs
    if has_image:
        left = left_visible[toks].to(_I64)
        right = right_visible[toks].to(_I64)
    else:
        left = torch.zeros_like(pos)
        right = torch.zeros_like(pos)
    left_add = (left - (window_size - 1)).clamp(min=0)
    start = (pos - (window_size - 1) - left_add).clamp(min=0)
    start = torch.maximum(start, replay_start.to(_I64)[req])
    end = pos + right + 1
    swa_len = torch.where(valid, end - start, torch.zeros_like(end))
    swa_lens[:num_tokens] = swa_len.to(swa_lens.dtype)

    width = int(index_width)
    if width <= 0:
        return None
    offs = torch.arange(width, dtype=_I64, device=dev)
    p = start.unsqueeze(1) + offs  # [T, W]
    inside = (offs.unsqueeze(0) < swa_len.unsqueeze(1)) & valid.unsqueeze(1)
    col = torch.where(inside, torch.div(p, block_size, rounding_mode="floor"), torch.zeros_like(p))
    rows = req.unsqueeze(1).expand_as(p)
    blocks = block_table[rows, col]
    slot = blocks.to(_I64) * block_size + torch.remainder(p, block_size)
    out = torch.where(inside, slot, torch.full_like(slot, -1))
    # The kernel addresses row p at p * swa_indices.stride(0), elements contiguous ([T, W] or [T, 1, W]).
    rows_view = swa_indices.as_strided((num_tokens, width), (swa_indices.stride(0), 1), swa_indices.storage_offset())
    rows_view.copy_(out.to(swa_indices.dtype))
    return None


# ---------------------------------------------------------------------------------------------------
# sparse_swa.py: ComputePrefillMetadataKernel (one program; writes prefill_gather_lens[:num_prefills]).
# ---------------------------------------------------------------------------------------------------
def prefill_metadata(
    self: Any,
    prefill_gather_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    replay_start: torch.Tensor,
    num_prefills: int,
    num_decodes: int,
    window_size: int,
) -> None:
    if getattr(self, "_warming", False) or num_prefills <= 0:
        return None
    lo, hi = num_decodes, num_decodes + num_prefills
    qsl = query_start_loc.to(_I64)
    qlen = qsl[lo + 1 : hi + 1] - qsl[lo:hi]
    prefix = seq_lens[lo:hi].to(_I64) - qlen
    visible = (prefix - replay_start[lo:hi].to(_I64)).clamp(min=0)
    gather = qlen + visible.clamp(max=window_size - 1)
    prefill_gather_lens[:num_prefills] = gather.to(prefill_gather_lens.dtype)
    return None


# ---------------------------------------------------------------------------------------------------
# vllm/v1/attention/backends/mla/indexer.py: PrepareUniformDecodeKernel (grid: num_decode_tokens programs).
# Copies `expanded_block_table.stride(0)` entries of block_table's row (as the kernel does, by address).
# ---------------------------------------------------------------------------------------------------
def prepare_uniform_decode(
    self: Any,
    seq_lens: torch.Tensor,
    decode_seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    expanded_block_table: torch.Tensor,
    decode_lens: torch.Tensor,
    num_decode_tokens: int,
    max_decode_len: int,
) -> None:
    if getattr(self, "_warming", False) or num_decode_tokens <= 0:
        return None
    dev = seq_lens.device
    idx = torch.arange(num_decode_tokens, dtype=_I64, device=dev)
    req = _tdiv(idx, max_decode_len)
    local = _tmod(idx, max_decode_len)
    per_token = (seq_lens.to(_I64)[req] - max_decode_len + local + 1).clamp(min=0)
    decode_seq_lens[:num_decode_tokens] = per_token.to(decode_seq_lens.dtype)

    width = expanded_block_table.stride(0)
    bt_stride = block_table.stride(0)
    num_src = int(req[-1].item()) + 1
    src = block_table.as_strided((num_src, width), (bt_stride, block_table.stride(1) if block_table.dim() > 1 else 1),
                                 block_table.storage_offset())
    dst = expanded_block_table.as_strided((num_decode_tokens, width), (width, 1), expanded_block_table.storage_offset())
    dst.copy_(src.index_select(0, req).to(dst.dtype))
    decode_lens[:num_decode_tokens] = 1
    return None


# ---------------------------------------------------------------------------------------------------
# indexer.py: BuildPrefillChunkMetadataKernel (grid: num_reqs programs).
# ---------------------------------------------------------------------------------------------------
def build_prefill_chunk_metadata(
    self: Any,
    query_start_loc: torch.Tensor,
    uncompressed_seq_lens: torch.Tensor,
    cu_compressed_seq_lens: torch.Tensor,
    row_start_cu_compressed_seq_lens: torch.Tensor,
    token_to_seq: torch.Tensor,
    cu_compressed_seq_len_ks: torch.Tensor,
    cu_compressed_seq_len_ke: torch.Tensor,
    query_slice_start: int,
    query_slice_stop: int,
    DCP_RANK: int,
    DCP_WORLD: int,
    DCP_INTERLEAVE: int,
    *,
    num_reqs: int,
    COMPRESS_RATIO: int,
    positions: torch.Tensor | None = None,
) -> None:
    """`positions` (vLLM 0.34.0 on, ShardQ): each query token's position, when a request's tokens are not its
    contiguous last ones; the per-token context is then positions[abs_pos] + 1."""
    if getattr(self, "_warming", False) or num_reqs <= 0:
        return None
    qsl = query_start_loc[: num_reqs + 1].to(_I64)
    qlen = qsl[1:] - qsl[:-1]
    req, off = _segments(qlen)
    if req.numel():
        abs_pos = qsl[req] + off
        keep = (abs_pos >= query_slice_start) & (abs_pos < query_slice_stop)
        req, off, abs_pos = req[keep], off[keep], abs_pos[keep]
        out_pos = abs_pos - query_slice_start
        row_start = row_start_cu_compressed_seq_lens[:num_reqs].to(_I64)[req]
        start_pos = uncompressed_seq_lens[:num_reqs].to(_I64)[req] - qlen[req]
        ctx = start_pos + 1 + off if positions is None else positions.to(_I64)[abs_pos] + 1
        per_token = _tdiv(ctx, COMPRESS_RATIO)
        if DCP_WORLD > 1:
            base = _tdiv(_tdiv(per_token, DCP_INTERLEAVE), DCP_WORLD) * DCP_INTERLEAVE
            rem = per_token - base * DCP_WORLD
            rem = (rem - DCP_RANK * DCP_INTERLEAVE).clamp(min=0).clamp(max=DCP_INTERLEAVE)
            per_token = base + rem
        cu_compressed_seq_len_ks[out_pos] = row_start.to(cu_compressed_seq_len_ks.dtype)
        cu_compressed_seq_len_ke[out_pos] = (row_start + per_token).to(cu_compressed_seq_len_ke.dtype)

    cu = cu_compressed_seq_lens[: num_reqs + 1].to(_I64)
    seq, soff = _segments(cu[1:] - cu[:-1])
    if seq.numel():
        token_to_seq[cu[seq] + soff] = seq.to(token_to_seq.dtype)
    return None


# ---------------------------------------------------------------------------------------------------
# vllm/v1/attention/ops/metadata.py: _token_request_mapping_kernel, a bare @triton.jit kernel launched as
# `kernel[grid](...)` by compute_token_to_req_indices (CommonAttentionMetadata.token_to_req_indices).
# Token t < num_tokens gets the request whose [start, end) holds it, found by binary search over the
# request ends (the first request whose end exceeds t, clamped to num_reqs - 1), or 0 if t >= num_mapped.
# For a non-decreasing query_start_loc that search is `searchsorted(ends, t, right=True)`.
# ---------------------------------------------------------------------------------------------------
def token_request_mapping(
    query_start_loc: torch.Tensor,
    output: torch.Tensor,
    num_reqs: int,
    num_mapped: int,
    num_tokens: int,
    **_launch_options: Any,  # num_warps
) -> None:
    if num_tokens <= 0:
        return None
    dev = output.device
    tok = torch.arange(num_tokens, dtype=_I64, device=dev)
    ends = query_start_loc[1 : num_reqs + 1].to(_I64).contiguous()
    req = torch.searchsorted(ends, tok, right=True).clamp(max=num_reqs - 1)
    out = torch.where(tok < num_mapped, req, torch.zeros_like(req))
    output[:num_tokens] = out.to(output.dtype)
    return None


def dspark_noncausal_swa_indices(
    self: Any,
    swa_indices: torch.Tensor,
    swa_lens: torch.Tensor,
    window_size: int,
    index_width: int,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    token_to_req_indices: torch.Tensor,
    is_valid_token: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    *,
    num_tokens: int,
    token_offset: int,
) -> None:
    """`ComputeDSparkNoncausalSWAIndicesKernel` (vLLM 0.34.0, `sparse_swa.py`, the DSpark speculative path):
    every token of a request's draft block sees the same window, the trailing `window_size` context tokens
    plus the whole block: start = max(prefix_len - window_size, 0), end = seq_len. A padded (invalid) token
    gets length 0 and a row of -1; columns at or past the length are -1; only `index_width` columns written."""
    if getattr(self, "_warming", False) or num_tokens <= 0:
        return None
    dev = swa_indices.device
    toks, valid, req, qs, qlen = _token_rows(query_start_loc, token_to_req_indices, is_valid_token, token_offset,
                                             num_tokens, dev)
    seq = seq_lens.to(_I64)[req]
    start = (seq - qlen - int(window_size)).clamp(min=0)
    swa_len = torch.where(valid, seq - start, torch.zeros_like(seq))
    swa_lens[:num_tokens] = swa_len.to(swa_lens.dtype)
    width = int(index_width)
    if width <= 0:
        return None
    offs = torch.arange(width, dtype=_I64, device=dev)
    p = start.unsqueeze(1) + offs  # [T, W]
    inside = (offs.unsqueeze(0) < swa_len.unsqueeze(1)) & valid.unsqueeze(1)
    col = torch.where(inside, torch.div(p, block_size, rounding_mode="floor"), torch.zeros_like(p))
    blocks = block_table[req.unsqueeze(1).expand_as(p), col]
    slot = blocks.to(_I64) * block_size + torch.remainder(p, block_size)
    out = torch.where(inside, slot, torch.full_like(slot, -1))
    rows_view = swa_indices.as_strided((num_tokens, width), (swa_indices.stride(0), 1), swa_indices.storage_offset())
    rows_view.copy_(out.to(swa_indices.dtype))
    return None


class GridLaunch:
    """Stands in for a `@triton.jit` function launched as `kernel[grid](*args, **kwargs)`: the torch
    implementation covers the whole grid in one call, so the grid is not needed."""

    def __init__(self, impl: Callable[..., None], original: Any) -> None:
        self.impl = impl
        self.original = original
        self.__name__ = getattr(impl, "__name__", "grid_launch")
        self.__wrapped__ = original

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return self.impl

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return self.impl(*args, **kwargs)


@dataclass(frozen=True)
class FunctionSite:
    module: str
    attr: str  # module attribute holding the @triton.jit function
    impl: Callable[..., None]

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attr}"

    def replacement(self, module: Any) -> tuple[Any, str, Any] | None:
        """(owner, attribute, value) to set in `module`, or None where the function is gone."""
        original = getattr(module, self.attr, None)
        return None if original is None else (module, self.attr, GridLaunch(self.impl, original))


FUNCTION_SITES: tuple[FunctionSite, ...] = (
    FunctionSite("vllm.v1.attention.ops.metadata", "_token_request_mapping_kernel", token_request_mapping),
)


@dataclass(frozen=True)
class KernelSite:
    module: str  # where the owner class lives
    owner: str  # the VllmTritonJitKernel subclass whose __call__ is replaced
    impl: Callable[..., None]
    since: str | None = None  # the vLLM release that added the kernel: absent before it, silently

    @property
    def attr(self) -> str:
        return self.owner

    @property
    def target(self) -> str:
        return f"{self.module}.{self.owner}.__call__"

    def replacement(self, module: Any) -> tuple[Any, str, Any] | None:
        """(owner, attribute, value) to set in `module`, or None where the class is gone."""
        owner = getattr(module, self.owner, None)
        return None if owner is None else (owner, "__call__", self.impl)


SITES: tuple[KernelSite, ...] = (
    KernelSite("vllm.v1.attention.backends.mla.compressor_utils", "CompressedSlotMappingKernel",
               compressed_slot_mapping),
    KernelSite("vllm.v1.attention.backends.mla.sparse_swa", "ComputeSWAIndicesAndLensKernel",
               swa_indices_and_lens),
    KernelSite("vllm.v1.attention.backends.mla.sparse_swa", "ComputePrefillMetadataKernel", prefill_metadata),
    KernelSite("vllm.v1.attention.backends.mla.indexer", "PrepareUniformDecodeKernel", prepare_uniform_decode),
    KernelSite("vllm.v1.attention.backends.mla.indexer", "BuildPrefillChunkMetadataKernel",
               build_prefill_chunk_metadata),
    KernelSite("vllm.v1.attention.backends.mla.sparse_swa", "ComputeDSparkNoncausalSWAIndicesKernel",
               dspark_noncausal_swa_indices, since="0.34.0"),
)
