"""What the indexer-cache hooks did in this process: a stats file (envs.STATS_DIR) and capture files
(envs.CAPTURE_DIR, debugging and the end-to-end tests). Both off unless their variable is set.

Stats file `indexer-epilog-<pid>.json`, rewritten (atomically) after each write or read:
    {"pid", "site", "enabled", "mode", "round_scale", "fp8", "writer", "write_calls", "rows_written",
     "scale": {"min", "max", "mean_log2", "log2_histogram"}, "reads": {"plugin": n, "vllm": n},
     "max_read_len", "topk_calls", "ranks"}
Capture files `capture-<pid>-<n>.pt` (torch.save of a dict), at most envs.capture_limit() per process, each
with "pid" and "ranks" besides the fields of its kind:
    kind "write": x (the compressor's bf16 rows of the written tokens), slots, codes / scale_bytes (the cache
                  rows as written), vllm_codes / vllm_scale (what vLLM's own write path writes for the same
                  input: its C++ op, or the compat op), mode, round_scale, fp8
    kind "read":  the query side of one `fp8_paged_mqa_logits_cpu` call (prefill or decode), captured before
                  scoring: q (the FP8 queries' bytes, uint8 [B, H, 128]), q_dtype (e.g. "torch.float8_e4m3fn"),
                  weight (float32 [B, H], vLLM's per-head weights with the query scale folded in), seq_lens
                  (each row's causal length in compressed positions), page_table, block_size, max_seq_len, reader
                  ("plugin" or "vllm"); with the "write" captures before it (slot -> x) it is enough to rescore
                  the call offline with any key format (benchmarks/quality_per_mode.py)
    kind "topk":  raw (the indexer's top-512 local positions per query row), seq_lens
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from typing import Any

import torch

from ... import envs

_lock = threading.Lock()


def ranks() -> dict[str, int] | None:
    """This process's place in vLLM's distributed engine, {"tp", "dp", "world"} (rank in the tensor-parallel
    group, rank in the data-parallel group, global rank), once vLLM has built its process groups; None before
    that or outside vLLM. The worker processes of a TP or DP server are told apart by it (their pids say
    nothing about which shard they run). Never imports vLLM: only reads it where this process already did."""
    import sys

    ps = sys.modules.get("vllm.distributed.parallel_state")
    if ps is None:
        return None
    groups = {"tp": getattr(ps, "_TP", None), "dp": getattr(ps, "_DP", None), "world": getattr(ps, "_WORLD", None)}
    if any(g is None for g in groups.values()):
        return None
    try:
        return {name: int(g.rank_in_group) for name, g in groups.items()}
    except (AttributeError, TypeError, ValueError):
        return None


class Recorder:
    def __init__(self) -> None:
        self.stats_dir = envs.stats_dir()
        self.capture_dir = envs.capture_dir()
        self.capture_limit = envs.capture_limit()
        self.captured = 0
        self.info: dict[str, Any] = {"pid": os.getpid(), "site": None, "enabled": None, "mode": None,
                                     "round_scale": None, "fp8": None, "writer": None, "write_calls": 0,
                                     "rows_written": 0, "reads": {"plugin": 0, "vllm": 0}, "max_read_len": 0,
                                     "topk_calls": 0, "ranks": None}
        self._log2: Counter[int] = Counter()
        self._scale_min = math.inf
        self._scale_max = 0.0

    @property
    def active(self) -> bool:
        return self.stats_dir is not None or self.capture_dir is not None

    @property
    def capturing(self) -> bool:
        return self.capture_dir is not None and self.captured < self.capture_limit

    def configure(self, **fields: Any) -> None:
        self.info.update(fields)
        self.flush()

    def wrote(self, writer: str, scales_f32: torch.Tensor) -> None:
        """One write call of `scales_f32.numel()` rows whose stored scales (as float32) are given."""
        info = self.info
        info["writer"] = writer
        info["write_calls"] += 1
        info["rows_written"] += int(scales_f32.numel())
        if scales_f32.numel():
            pos = scales_f32[scales_f32 > 0]
            if pos.numel():
                self._scale_min = min(self._scale_min, float(pos.min()))
                self._scale_max = max(self._scale_max, float(pos.max()))
                self._log2.update(torch.floor(torch.log2(pos)).to(torch.int64).tolist())
        self.flush()

    def read(self, reader: str, length: int) -> None:
        self.info["reads"][reader] += 1
        self.info["max_read_len"] = max(self.info["max_read_len"], int(length))
        self.flush()

    def topk(self) -> None:
        self.info["topk_calls"] += 1

    def scale_summary(self) -> dict[str, Any]:
        n = sum(self._log2.values())
        return {
            "min": None if not n else self._scale_min,
            "max": None if not n else self._scale_max,
            "mean_log2": None if not n else sum(k * v for k, v in self._log2.items()) / n,
            "log2_histogram": {str(k): v for k, v in sorted(self._log2.items())},
        }

    def flush(self) -> None:
        if self.stats_dir is None:
            return
        with _lock:
            self.stats_dir.mkdir(parents=True, exist_ok=True)
            path = self.stats_dir / f"indexer-epilog-{os.getpid()}.json"
            tmp = path.with_suffix(".tmp")
            self.info["ranks"] = ranks() or self.info["ranks"]
            tmp.write_text(json.dumps({**self.info, "scale": self.scale_summary()}, indent=1))
            os.replace(tmp, path)

    def capture(self, record: dict[str, Any]) -> None:
        if not self.capturing:
            return
        assert self.capture_dir is not None
        with _lock:
            self.capture_dir.mkdir(parents=True, exist_ok=True)
            path = self.capture_dir / f"capture-{os.getpid()}-{self.captured:05d}.pt"
            self.captured += 1
            tmp = path.with_suffix(".tmp")
            torch.save({**record, "pid": os.getpid(), "ranks": ranks()}, tmp)
            os.replace(tmp, path)


recorder = Recorder()


def reset() -> None:
    """Re-read the variables (tests)."""
    global recorder
    recorder = Recorder()
