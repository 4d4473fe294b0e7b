"""Stand-in torch_npu for the reduced sites: the two calls the indexer write sites make, recorded
(tests/fakes/npu_ops.py, shared with the real-release stand-in). A fresh import starts a fresh record."""

from __future__ import annotations

from fakes.npu_ops import RecordingNpuOps

_ops = RecordingNpuOps()
CALLS = _ops.calls
npu_dynamic_quant = _ops.npu_dynamic_quant
npu_scatter_nd_update_ = _ops.npu_scatter_nd_update_
