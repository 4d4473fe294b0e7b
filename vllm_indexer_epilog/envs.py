"""Every environment variable this package reads: one prefix, one home. README's "Environment variables"
section documents each; nothing else in the package calls os.environ directly.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "VLLM_INDEXER_EPILOG_"

STRICT = PREFIX + "STRICT"
"""1: every backend checks slots on the host and rejects duplicates (accelerators otherwise skip bad rows)."""

CACHE = PREFIX + "CACHE"
"""Folder for compiled kernels and downloaded test wheels (default ~/.cache/vllm_indexer_epilog)."""

NPU_BACKEND = PREFIX + "NPU_BACKEND"
"""auto | custom_ops | c_ascend_v2 | reference: forces the NPU implementation."""


def strict() -> bool:
    return os.environ.get(STRICT, "0").strip() not in ("", "0", "false", "False")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE) or Path.home() / ".cache" / "vllm_indexer_epilog")


def npu_backend() -> str:
    return os.environ.get(NPU_BACKEND, "auto").strip().lower()
