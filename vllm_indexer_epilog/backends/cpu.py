"""Builds (once, cached) and loads the compiled CPU kernel from csrc/.

The build happens on first use, not at install: it needs only the torch that is present at run time,
and `-march=native` code is built on the machine that runs it. The cache key covers the sources, the
torch version, the flags and the host's CPU feature flags, so a changed source or a different CPU
gets a fresh build. `VLLM_INDEXER_EPILOG_CACHE` moves the cache (default ~/.cache/vllm_indexer_epilog).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = ("cpu/indexer_compress_epilog_cpu.cpp", "fp8_codec.h")
LIBRARY = "vllm_indexer_epilog_cpu"
# No -ffast-math: results must be IEEE. -fno-trapping-math only lets GCC if-convert FP operations.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
_lock = threading.Lock()
_loaded: bool | None = None


def csrc_dir() -> Path:
    """csrc/ of a source checkout (editable install), else the copy packaged inside a wheel."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if (candidate / _SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"csrc sources not found next to {package}")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build_key(src: Path, flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((src / name).read_bytes())
    h.update(" ".join([torch.__version__, *flags, _cpu_flags()]).encode())
    return h.hexdigest()[:16]


def load_cpu_kernel() -> bool:
    """Build/load the extension; True when `torch.ops.vllm_indexer_epilog_cpu` is usable."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build_and_load()
        return _loaded


def build_cpu_kernel(march: str = "native", library: str = LIBRARY) -> None:
    """Compile (or reuse from the cache) and load the kernel as `torch.ops.<library>`.

    The default is what the op uses; the tests also build `march="x86-64"` (no AVX2) under another name
    to check the portable code path.
    """
    from torch.utils.cpp_extension import load

    src = csrc_dir()
    flags = [*_CFLAGS, f"-march={march}", f"-DVIE_LIBRARY_NAME={library}"]
    key = _build_key(src, flags)
    root = Path(os.environ.get("VLLM_INDEXER_EPILOG_CACHE", Path.home() / ".cache" / "vllm_indexer_epilog"))
    build_dir = root / f"cpu-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        logger.warning("vllm_indexer_epilog: compiling the CPU kernel (%s) once into %s", march, build_dir)
    load(
        name=f"{library}_{key}",
        sources=[str(src / _SOURCES[0])],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def _build_and_load() -> bool:
    try:
        build_cpu_kernel()
        return True
    except Exception as exc:  # no compiler, no ninja, read-only home, ...: stay correct, just slower
        logger.warning(
            "vllm_indexer_epilog: CPU kernel unavailable (%s: %s); the CPU backend falls back to the torch reference",
            type(exc).__name__,
            exc,
        )
        return False
