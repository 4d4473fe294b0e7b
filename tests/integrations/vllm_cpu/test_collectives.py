"""The compat layer's variable-size collectives (vllm_cpu_compat/collectives.py), on two real gloo processes on
127.0.0.1: what each rank gets equals what one process computes from every rank's input. The communicator is
a stand-in with vLLM's CpuCommunicator's fixed-size collectives (no vLLM needed); the DP=2 server test
(test_serve_distributed.py) runs them inside vLLM. A few seconds.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_indexer_epilog.integrations.vllm_cpu_compat.collectives import all_gatherv, missing, reduce_scatterv

SIZES = [3, 1]  # tokens per rank, unequal as in a DP step where one rank has fewer requests


class _Communicator:
    """What the two methods use of vLLM's CpuCommunicator: world size, rank, all_gather along a dim, all_reduce."""

    def __init__(self) -> None:
        self.world_size = dist.get_world_size()
        self.rank_in_group = dist.get_rank()

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(input_) for _ in range(self.world_size)]
        dist.all_gather(parts, input_)
        return torch.cat(parts, dim=dim)

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(input_)
        return input_


def _rank_input(rank: int, rows: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    t = torch.randn(rows, 5, generator=g).to(torch.bfloat16)
    return t if dim == 0 else t.t().contiguous()


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        comm = _Communicator()
        results = {}
        for dim in (0, 1):
            mine = _rank_input(rank, SIZES[rank], dim)
            results[f"gatherv{dim}"] = all_gatherv(comm, mine, dim=dim, sizes=SIZES)
            results[f"gatherv_list{dim}"] = all_gatherv(comm, [mine, mine * 2], dim=dim, sizes=SIZES)
            full = _rank_input(rank, sum(SIZES), dim)
            kept = full.clone()
            results[f"scatterv{dim}"] = reduce_scatterv(comm, full, dim=dim, sizes=SIZES)
            results[f"untouched{dim}"] = torch.equal(full, kept)
        results["even"] = all_gatherv(comm, _rank_input(rank, 2, 0), dim=0, sizes=None)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_variable_size_collectives_on_two_gloo_ranks(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for dim in (0, 1):
        inputs = [_rank_input(r, SIZES[r], dim) for r in range(2)]
        want = torch.cat(inputs, dim=dim)
        total = sum(_rank_input(r, sum(SIZES), dim).float() for r in range(2)).to(torch.bfloat16)
        for r in range(2):
            assert torch.equal(got[r][f"gatherv{dim}"], want)
            assert torch.equal(got[r][f"gatherv_list{dim}"][1], torch.cat([t * 2 for t in inputs], dim=dim))
            assert torch.equal(got[r][f"scatterv{dim}"], total.narrow(dim, sum(SIZES[:r]), SIZES[r]))
            assert got[r][f"untouched{dim}"]
    assert torch.equal(got[0]["even"], torch.cat([_rank_input(r, 2, 0) for r in range(2)]))


def test_only_the_base_class_methods_are_replaced() -> None:
    class Base:
        def all_gatherv(self) -> None: ...

        def reduce_scatterv(self) -> None: ...

    class Lacks(Base):
        pass

    class Has(Base):
        def reduce_scatterv(self) -> None: ...

    assert missing(Lacks, Base) == ["all_gatherv", "reduce_scatterv"]
    assert missing(Has, Base) == ["all_gatherv"]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
