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
ones; a waiter gives up after `VLLM_INDEXER_EPILOG_BUILD_WAIT_S` (default 120 s) and uses the torch
reference, with a warning naming the holder. A lock holder removes every `*.tmp.so` of its folder before
and after compiling: they belong to builders killed while their compiler ran on. A cached .so that does not
load (truncated, overwritten) is replaced by one rebuild; if that one does not load either, the reference
serves.

No cache path can break an import: a path the OS refuses to check (unreadable parent, a component too
long, a file where a folder should be) makes this process use the reference, with one warning naming the
path and the reason.
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

_SOURCES = ("cpu/indexer_compress_epilog_cpu.cpp", "fp8_codec.h", "hif8_codec.h")
LIBRARY = "vllm_indexer_epilog_cpu"
# No -ffast-math: results must be IEEE. -fno-trapping-math only lets GCC if-convert FP operations.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
BUILD_WAIT_S: float | None = None
"""Tests: overrides `envs.build_wait_s()`, how long a process waits for another one's build of the same key."""
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
    cxx = envs.cxx()
    found = shutil.which(cxx)
    if found is None:
        raise FileNotFoundError(f"no C++ compiler: {envs.quote(cxx)} (from $CXX, default c++) is not on PATH")
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
            try:
                holder = lock_path.read_text()[:200].strip() or "?"
            except OSError:
                holder = "?"
            raise TimeoutError(
                f"the CPU kernel build lock {lock_path} has been held by a live process ({holder}) for more than "
                f"{timeout_s:g} s ({envs.BUILD_WAIT_S}); this process uses the torch reference; if no build is "
                f"running, remove the folder {lock_path.parent}"
            )
        time.sleep(0.2)


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _remove_orphans(folder: Path) -> None:
    # Only a lock holder calls this, and a live builder holds the lock for as long as its compiler runs:
    # every temporary file here belongs to a builder that died while its compiler ran on.
    for stale in folder.glob("*.tmp.so"):
        stale.unlink(missing_ok=True)


def _build(src: Path, flags: list[str], out: Path, march: str, bad: tuple[int, int, int] | None = None) -> None:
    """Compile into `out`, atomically; a concurrent builder of the same key is waited for, not repeated.

    `bad`: the identity of an `out` that did not load; it is replaced unless another builder already did.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / "build.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC by default: the compiler never holds it
    try:
        _wait_for_lock(fd, lock_path, envs.build_wait_s() if BUILD_WAIT_S is None else BUILD_WAIT_S)
        found = _file_id(out)
        if found is not None and found != bad:  # the holder we waited for finished (or replaced) it
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        _remove_orphans(out.parent)
        tmp = out.parent / f"{out.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.so"
        command = _compile_command(src, flags, tmp)  # no compiler: raises here, before announcing a build
        again = " again: the cached build does not load" if bad is not None else ""
        logger.warning("vllm_indexer_epilog: compiling the CPU kernel (%s) once into %s%s", march, out.parent, again)
        try:
            res = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if res.returncode != 0:
                raise RuntimeError(f"compiler exited with {res.returncode}: {res.stderr[-4000:]}")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
            _remove_orphans(out.parent)
    finally:
        os.close(fd)  # releases the flock


def build_cpu_kernel(march: str = "native", library: str = LIBRARY) -> Path:
    """Compile (or reuse from the cache) and load the kernel library as `torch.ops.<library>`.

    The default is what the op uses (on an AVX-512 host, the AVX-512 path); the tests also build
    `march="x86-64"` (no AVX2: the portable path) and `march="x86-64-v3"` (the AVX2 path) under other names
    to check those paths, and benchmarks/bench_cpu.py `--isa` times them. Loading never registers anything under `custom::`. A cached file
    that does not load is rebuilt once.
    """
    src = csrc_dir()
    flags = _flags(march, library)
    out = envs.cache_dir() / f"cpu-{_build_key(src, flags)}" / f"{library}.so"
    bad = None
    if out.exists():
        bad = _file_id(out)
        try:
            _load(out)
            return out
        except OSError as exc:  # dlopen refused it: a failed dlopen leaves nothing loaded, so a rebuild can
            logger.info("vllm_indexer_epilog: cached CPU kernel %s does not load (%s)", out, exc)
    _build(src, flags, out, march, bad)
    _load(out)
    return out


def _load(path: Path) -> None:
    torch.ops.load_library(str(path))
    _connect_strict(path)


@ctypes.CFUNCTYPE(ctypes.c_int)
def _strict_for_kernel() -> int:
    """Strict mode for the compiled kernel, parsed by envs (the kernel reads no variable itself). It asks
    only when a call names one slot twice, so the common call never reaches Python; ctypes takes the GIL."""
    try:
        return int(envs.strict())
    except BaseException:  # nothing may cross back into C++
        logger.exception("vllm_indexer_epilog: reading %s failed; strict mode off for this call", envs.STRICT)
        return 0


def _connect_strict(path: Path) -> None:
    # dlopen of a loaded library returns its handle; the callback object lives as long as this module.
    ctypes.CDLL(str(path)).vie_set_strict_source(_strict_for_kernel)


def load_prebuilt_kernel() -> bool:
    """Load this machine's cached build if there is one; never compiles and never raises (safe at import).

    A cache path that cannot even be checked decides this process for the reference (one warning); a
    cached file that does not load is left for the first call, which rebuilds it.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                envs.cache_dir()
            except Exception as exc:  # no home folder to put it in (RuntimeError)
                _loaded = _unavailable(f"no cache folder: {type(exc).__name__}: {exc}")
                return False
            try:
                path = kernel_path()
            except OSError:  # csrc/ missing or unreadable: the first call reports it
                return False
            try:
                if not path.exists():
                    return False
            except Exception as exc:  # PermissionError, ENAMETOOLONG, ...: building there would fail too
                _loaded = _unavailable(f"cache path {path}: {type(exc).__name__}: {exc}")
                return False
            try:
                _load(path)
            except Exception as exc:  # OSError from dlopen; whatever else a foreign file does at load
                logger.info("vllm_indexer_epilog: cached CPU kernel %s does not load (%s); the first call "
                            "rebuilds it", path, exc)
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


def _unavailable(reason: str) -> bool:
    logger.warning(
        "vllm_indexer_epilog: CPU kernel unavailable (%s); the CPU backend falls back to the torch reference", reason
    )
    return False


def _build_and_load() -> bool:
    try:
        build_cpu_kernel()
        return True
    except Exception as exc:  # no compiler, read-only cache, a path the OS refuses: stay correct, just slower
        try:
            where = f"cache {envs.cache_dir()}: "
        except Exception:
            where = ""
        return _unavailable(f"{where}{type(exc).__name__}: {exc}")
