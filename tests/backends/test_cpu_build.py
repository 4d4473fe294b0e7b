"""Getting the compiled CPU kernel onto a machine: a build killed mid-way (SIGKILL, OOM) must not block the
next one; a waiter gives up after a bound with a clear message; a cached build is loaded and registered at
import without compiling; a machine without a compiler warns once and runs the torch reference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import ROOT
from vllm_indexer_epilog.backends import cpu as cpu_backend

# Writes one row through the op and compares it with the reference; reports how the CPU kernel was reached.
CALL_OP = textwrap.dedent(
    """
    import time
    t0 = time.perf_counter()
    import torch, vllm_indexer_epilog
    from vllm_indexer_epilog.backends import cpu
    import_s = time.perf_counter() - t0
    native_at_import = cpu.native_kernel_registered()
    x = torch.randn(3, 200).to(torch.bfloat16)
    slots = torch.tensor([5, -1, 1])
    for _ in range(2):
        c, s = torch.zeros(8, 200, dtype=torch.float8_e4m3fn), torch.zeros(8, 2)
        torch.ops.custom.indexer_compress_epilog(c, s, x, slots)
    wc, ws = torch.zeros(8, 200, dtype=torch.float8_e4m3fn), torch.zeros(8, 2)
    vllm_indexer_epilog.reference_indexer_compress_epilog(wc, ws, x, slots)
    assert torch.equal(c.view(torch.uint8), wc.view(torch.uint8)) and torch.equal(s, ws)
    print("OK", native_at_import, cpu.native_kernel_registered(), f"{import_s:.3f}")
    """
)


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, VLLM_INDEXER_EPILOG_CACHE=str(cache), **extra)
    env.pop("VLLM_INDEXER_EPILOG_STRICT", None)
    return env


def _run(code: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in _descendants(k)]


def test_killed_build_does_not_block_the_next(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    builder = subprocess.Popen(
        [sys.executable, "-c", "from vllm_indexer_epilog.backends.cpu import build_cpu_kernel; build_cpu_kernel()"],
        cwd=ROOT, env=_env(cache), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Wait until the compiler runs (the lock is held and a child process exists), then kill the whole
        # group, compiler included, as an OOM kill of the session would.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (list(cache.glob("cpu-*/build.lock")) and _descendants(builder.pid)):
            assert builder.poll() is None, "the builder exited before compiling"
            time.sleep(0.1)
        assert _descendants(builder.pid), "the compiler never started"
        time.sleep(1.0)
    finally:
        os.killpg(builder.pid, signal.SIGKILL)
        builder.wait(30)
    assert not list(cache.glob("cpu-*/*.so")) or all(p.name.endswith(".tmp.so") for p in cache.glob("cpu-*/*.so"))
    assert list(cache.glob("cpu-*/build.lock")), "the killed build left no lock file: the test proves nothing"

    # A new process builds (no hang on the dead builder's lock) within a bound, and registers natively.
    t0 = time.monotonic()
    out = _run(CALL_OP, _env(cache), timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]
    _, at_import, registered, _ = out.stdout.split()
    assert (at_import, registered) == ("False", "True"), out.stdout
    assert "compiling the CPU kernel" in out.stderr
    assert not list(cache.glob("cpu-*/*.tmp.so")), "the killed build's partial output was not cleaned up"
    build_s = time.monotonic() - t0

    # The next process loads the cached build at import: native from the first call, nothing compiled.
    out = _run(CALL_OP, _env(cache), timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]
    _, at_import, registered, import_s = out.stdout.split()
    assert (at_import, registered) == ("True", "True"), out.stdout
    assert "compiling" not in out.stderr, out.stderr
    print(f"rebuild after kill: {build_s:.0f} s; cached import: {import_s} s")


def test_waiting_for_a_live_builder_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live holder of the lock is waited for, but not forever: the error names the lock and its holder."""
    import fcntl

    out = tmp_path / "cpu-key" / "lib.so"
    out.parent.mkdir(parents=True)
    lock = out.parent / "build.lock"
    lock.write_text("pid 4242\n")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: the builder below cannot take it
    monkeypatch.setattr(cpu_backend, "BUILD_WAIT_S", 0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="build.lock.*pid 4242"):
            cpu_backend._build(cpu_backend.csrc_dir(), ["-O0"], out, "native")
        assert time.monotonic() - t0 < 10
    finally:
        os.close(fd)
    assert not out.exists()


def test_no_compiler_warns_once_and_runs_the_reference(tmp_path: Path) -> None:
    out = _run(CALL_OP, _env(tmp_path / "cache", CXX=str(tmp_path / "no-such-compiler")), timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]
    _, at_import, registered, _ = out.stdout.split()
    assert (at_import, registered) == ("False", "False"), out.stdout
    assert out.stderr.count("CPU kernel unavailable") == 1, out.stderr
    assert "falls back to the torch reference" in out.stderr
