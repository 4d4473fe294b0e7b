"""Builds (once, cached), loads and registers the compiled CPU kernel from csrc/.

The build happens on the machine that runs it, not at install: it needs only the torch present at run
time, and `-march=native` code must not travel in a wheel. The cache key covers the sources, the torch
version, the flags and the host's CPU feature flags, so a changed source or a different CPU gets a fresh
build. `VLLM_INDEXER_EPILOG_CACHE` moves the cache (default ~/.cache/vllm_indexer_epilog).

When the op is used:
- import: if this machine's build is already cached, the .so is loaded and registered as the CPU kernel
  of `custom::indexer_compress_epilog` (a dlopen, a few ms); nothing is ever compiled at import;
- otherwise the first CPU call compiles it (once per machine), then registers it.

Crash safety: the compiler writes to a private temporary file that is renamed into place only when
complete, so a half-written .so is never loaded; builders of one key serialize on an `flock`, which the
kernel drops when its holder dies (SIGKILL, OOM), so a killed build cannot leave a lock that blocks later
ones; a waiter gives up after `BUILD_WAIT_S` with a message naming the holder.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import torch

from .. import envs

logger = logging.getLogger(__name__)

_SOURCES = ("cpu/indexer_compress_epilog_cpu.cpp", "fp8_codec.h")
LIBRARY = "vllm_indexer_epilog_cpu"
# No -ffast-math: results must be IEEE. -fno-trapping-math only lets GCC if-convert FP operations.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
BUILD_WAIT_S = 900.0
"""How long a process waits for another one's build of the same key before giving up."""
COMPILE_TIMEOUT_S = 900.0

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried; the result of the first build-and-load otherwise
_registered = False


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


def _flags(march: str, library: str) -> list[str]:
    return [*_CFLAGS, f"-march={march}", f"-DVIE_LIBRARY_NAME={library}"]


def _build_key(src: Path, flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((src / name).read_bytes())
    h.update(" ".join([torch.__version__, *flags, _cpu_flags()]).encode())
    return h.hexdigest()[:16]


def kernel_path(march: str = "native", library: str = LIBRARY) -> Path:
    """Where the build for this machine, torch and source lives (whether or not it exists yet)."""
    flags = _flags(march, library)
    key = _build_key(csrc_dir(), flags)
    return envs.cache_dir() / f"cpu-{key}" / f"{library}.so"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    found = shutil.which(cxx)
    if found is None:
        raise FileNotFoundError(f"no C++ compiler: {cxx!r} (from $CXX, default c++) is not on PATH")
    return found


def _compile_command(src: Path, flags: list[str], out: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    includes = [f"-I{src}"] + [f"-isystem{p}" for p in cpp_extension.include_paths()]
    lib_dirs = [f"-L{p}" for p in cpp_extension.library_paths()]
    return [
        _compiler(), "-shared", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *flags, *includes, str(src / _SOURCES[0]), "-o", str(out),
        *lib_dirs, "-lc10", "-ltorch_cpu", "-ltorch", "-fopenmp",
    ]


def _wait_for_lock(fd: int, lock_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if not announced:
            logger.warning("vllm_indexer_epilog: waiting for another process's build of the CPU kernel (%s)", lock_path)
            announced = True
        if time.monotonic() >= deadline:
            holder = lock_path.read_text().strip() if lock_path.exists() else "?"
            raise TimeoutError(
                f"the CPU kernel build lock {lock_path} has been held by a live process ({holder}) for more than "
                f"{timeout_s:.0f} s; if no build is running, remove the folder {lock_path.parent}"
            )
        time.sleep(0.2)


def _build(src: Path, flags: list[str], out: Path, march: str) -> None:
    """Compile into `out`, atomically; a concurrent builder of the same key is waited for, not repeated."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / "build.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC by default: the compiler never holds it
    try:
        _wait_for_lock(fd, lock_path, BUILD_WAIT_S)
        if out.exists():  # the holder we waited for finished it
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        for stale in out.parent.glob("*.tmp.so"):  # left by a killed build; only a lock holder gets here
            stale.unlink(missing_ok=True)
        tmp = out.parent / f"{out.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.so"
        command = _compile_command(src, flags, tmp)  # no compiler: raises here, before announcing a build
        logger.warning("vllm_indexer_epilog: compiling the CPU kernel (%s) once into %s", march, out.parent)
        try:
            res = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if res.returncode != 0:
                raise RuntimeError(f"compiler exited with {res.returncode}: {res.stderr[-4000:]}")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


def build_cpu_kernel(march: str = "native", library: str = LIBRARY) -> Path:
    """Compile (or reuse from the cache) and load the kernel library as `torch.ops.<library>`.

    The default is what the op uses; the tests also build `march="x86-64"` (no AVX2) under another name
    to check the portable code path. Loading never registers anything under `custom::`.
    """
    src = csrc_dir()
    flags = _flags(march, library)
    out = envs.cache_dir() / f"cpu-{_build_key(src, flags)}" / f"{library}.so"
    if not out.exists():
        _build(src, flags, out, march)
    torch.ops.load_library(str(out))
    return out


def load_prebuilt_kernel() -> bool:
    """Load this machine's cached build if there is one; never compiles (safe at import)."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                path = kernel_path()
            except OSError:  # csrc/ missing: the first call reports it
                return False
            if not path.exists():
                return False
            try:
                torch.ops.load_library(str(path))
            except OSError as exc:
                logger.warning("vllm_indexer_epilog: cached CPU kernel %s does not load (%s)", path, exc)
                return False
            _loaded = True
        return bool(_loaded)


def load_cpu_kernel() -> bool:
    """Build/load the kernel once; True when `torch.ops.vllm_indexer_epilog_cpu` is usable."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build_and_load()
        return _loaded


def register_native_kernel() -> bool:
    """Make the loaded library the CPU kernel of `custom::indexer_compress_epilog` (once).

    The caller decides that the op has no CPU kernel yet; the C++ side checks that the schema is one it
    reads (ours, or Ascend's with `scale`).
    """
    global _registered
    with _lock:
        if _registered:
            return True
        if not _loaded:
            return False
        handle = ctypes.CDLL(str(kernel_path()))  # already loaded: dlopen returns the same handle
        err = ctypes.create_string_buffer(1024)
        if handle.vie_register_cpu_kernel(err, ctypes.c_size_t(len(err))) != 0:
            logger.warning("vllm_indexer_epilog: native CPU kernel not registered (%s)", err.value.decode())
            return False
        _registered = True
        return True


def native_kernel_registered() -> bool:
    return _registered


def _build_and_load() -> bool:
    try:
        build_cpu_kernel()
        return True
    except Exception as exc:  # no compiler, read-only home, ...: stay correct, just slower
        logger.warning(
            "vllm_indexer_epilog: CPU kernel unavailable (%s: %s); the CPU backend falls back to the torch reference",
            type(exc).__name__,
            exc,
        )
        return False
