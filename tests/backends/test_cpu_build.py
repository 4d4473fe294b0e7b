"""Getting the compiled CPU kernel onto a machine: a build killed mid-way (SIGKILL, OOM) must not block the
next one; a waiter gives up after a bound with a clear message; a cached build is loaded and registered at
import without compiling; a machine without a compiler warns once and runs the torch reference."""

from __future__ import annotations

import os
import re
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


# ---- no cache path breaks the import; a bad cached build is replaced; orphans go; the wait is bounded ----

_NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _as_unprivileged_root() -> list[str]:
    """Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH obeys file modes like any user, so a mode-000 folder
    is unreadable for it as it is for uid 65534 in a container whose HOME is root's (that uid cannot run this
    venv's Python, which lives under /root). Only when running as root with setpriv available."""
    if os.geteuid() != 0 or subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE (as a normal user, chmod 000 works as is)")
    return _NO_DAC


def _on_a_read_only_mount(mnt: Path) -> list[str]:
    """Runs the command in a private mount namespace where `mnt` is a read-only tmpfs (real EROFS)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro none "$0"', str(mnt)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private read-only mount here ({probe.stderr.strip()[:200]})")
    return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro none "$0" && exec "$@"', str(mnt)]


@pytest.mark.parametrize(
    "case", ["component_too_long", "a_file", "below_a_file", "unreadable_home", "unwritable", "read_only_fs"]
)
def test_import_and_op_survive_any_cache_path(tmp_path: Path, case: str) -> None:
    """README: one warning naming the path and the reason, and the reference. `Path.exists()` used to raise at
    import (PermissionError, ENAMETOOLONG), which takes `vllm serve` down."""
    prefix: list[str] = []
    env = _env(tmp_path / "unused")
    if case == "component_too_long":
        cache = tmp_path / ("a" * 300)
    elif case in ("a_file", "below_a_file"):
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" if case == "a_file" else tmp_path / "file" / "below"
    elif case == "unreadable_home":
        prefix = _as_unprivileged_root()
        home = tmp_path / "home"
        home.mkdir(mode=0o000)
        home.chmod(0o000)
        env.pop("VLLM_INDEXER_EPILOG_CACHE")
        env["HOME"] = str(home)
        cache = home / ".cache" / "vllm_indexer_epilog"
    elif case == "unwritable":
        prefix = _as_unprivileged_root()
        cache = tmp_path / "ro" / "cache"
        cache.parent.mkdir()
        cache.parent.chmod(0o555)
    else:
        (tmp_path / "mnt").mkdir()
        prefix = _on_a_read_only_mount(tmp_path / "mnt")
        cache = tmp_path / "mnt" / "cache"
    if case != "unreadable_home":
        env["VLLM_INDEXER_EPILOG_CACHE"] = str(cache)
    out = subprocess.run([*prefix, sys.executable, "-c", CALL_OP], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]
    _, at_import, registered, _ = out.stdout.split()
    assert (at_import, registered) == ("False", "False"), out.stdout
    warnings = [line for line in out.stderr.splitlines() if "CPU kernel unavailable" in line]
    assert len(warnings) == 1, out.stderr
    assert "falls back to the torch reference" in warnings[0]
    assert str(cache)[:60] in warnings[0], warnings[0]
    assert re.search(r"PermissionError|File name too long|Not a directory|FileExistsError|NotADirectoryError|"
                     r"Read-only file system",
                     warnings[0]), warnings[0]


FAKE_CXX = """#!/bin/sh
# Stands in for c++: copies $VIE_TEST_SO to the -o argument; $VIE_TEST_ORPHAN names a *.tmp.so that appears
# in the same folder meanwhile, as the output of a killed builder's compiler that ran on.
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
cp "$VIE_TEST_SO" "$out"
if [ -n "$VIE_TEST_ORPHAN" ]; then : > "$(dirname "$out")/$VIE_TEST_ORPHAN"; fi
"""


@pytest.fixture
def built_kernel() -> Path:
    """This machine's real build (compiled once if needed), for the fake compiler to hand out."""
    if not cpu_backend.load_cpu_kernel():
        pytest.skip("the CPU kernel cannot be built here")
    return cpu_backend.kernel_path()


def _fake_cxx(tmp_path: Path) -> Path:
    cxx = tmp_path / "fake-cxx"
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    return cxx


def _key_path(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    with monkeypatch.context() as m:
        m.setenv("VLLM_INDEXER_EPILOG_CACHE", str(cache))
        return cpu_backend.kernel_path()


@pytest.mark.parametrize("content", [b"", b"\x7fELF not really a library" * 10], ids=["empty", "garbage"])
def test_corrupt_cached_build_is_rebuilt_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built_kernel: Path,
                                              content: bytes) -> None:
    """A truncated or overwritten .so used to be loaded and refused by every process, forever (reference)."""
    cache = tmp_path / "cache"
    bad = _key_path(cache, monkeypatch)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content)
    env = _env(cache, CXX=str(_fake_cxx(tmp_path)), VIE_TEST_SO=str(built_kernel))
    out = _run(CALL_OP, env, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]
    _, at_import, registered, _ = out.stdout.split()
    assert (at_import, registered) == ("False", "True"), out.stderr[-3000:]
    assert out.stderr.count("compiling the CPU kernel") == 1 and "does not load" in out.stderr, out.stderr
    assert bad.read_bytes() == built_kernel.read_bytes()
    # The next process loads the rebuilt file at import.
    out = _run(CALL_OP, env, timeout=120)
    assert out.stdout.split()[1:3] == ["True", "True"], out.stderr[-3000:]


def test_a_rebuild_that_does_not_load_either_falls_back_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    bad = _key_path(cache, monkeypatch)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    (tmp_path / "junk.so").write_bytes(b"still garbage")
    env = _env(cache, CXX=str(_fake_cxx(tmp_path)), VIE_TEST_SO=str(tmp_path / "junk.so"))
    out = _run(CALL_OP, env, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]
    assert out.stdout.split()[1:3] == ["False", "False"]
    assert out.stderr.count("compiling the CPU kernel") == 1, out.stderr
    assert out.stderr.count("CPU kernel unavailable") == 1, out.stderr


def test_orphaned_temporary_files_are_cleaned_by_the_next_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   built_kernel: Path) -> None:
    """Killing only the Python builder left its compiler running on, whose `*.tmp.so` nobody removed: one
    that predates the next build and one that appears while it compiles are both gone once it is done."""
    out = tmp_path / "cpu-key" / "lib.so"
    out.parent.mkdir(parents=True)
    (out.parent / "lib.111.deadbeef.tmp.so").write_bytes(b"half a library")
    monkeypatch.setenv("CXX", str(_fake_cxx(tmp_path)))
    monkeypatch.setenv("VIE_TEST_SO", str(built_kernel))
    monkeypatch.setenv("VIE_TEST_ORPHAN", "lib.222.cafebabe.tmp.so")
    cpu_backend._build(cpu_backend.csrc_dir(), ["-O0"], out, "native")
    assert out.read_bytes() == built_kernel.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["build.lock", "lib.so"]


def test_a_stuck_lock_holder_delays_start_up_by_a_bounded_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to be 900 s; now VLLM_INDEXER_EPILOG_BUILD_WAIT_S (default 120 s), then the reference, named."""
    import fcntl

    cache = tmp_path / "cache"
    lock = _key_path(cache, monkeypatch).parent / "build.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("pid 4242\n")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        t0 = time.monotonic()
        out = _run(CALL_OP, _env(cache, VLLM_INDEXER_EPILOG_BUILD_WAIT_S="1"), timeout=90)
        took = time.monotonic() - t0
    finally:
        os.close(fd)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]
    assert out.stdout.split()[1:3] == ["False", "False"]
    warnings = [line for line in out.stderr.splitlines() if "CPU kernel unavailable" in line]
    assert len(warnings) == 1 and "pid 4242" in warnings[0] and str(lock) in warnings[0], out.stderr
    assert "torch reference" in warnings[0] and "VLLM_INDEXER_EPILOG_BUILD_WAIT_S" in warnings[0]
    assert took < 60
    from vllm_indexer_epilog import envs

    monkeypatch.delenv(envs.BUILD_WAIT_S, raising=False)
    assert envs.build_wait_s() <= 120
