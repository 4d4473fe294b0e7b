"""csrc/fp8_codec.h's division-free forms against the division they replace (quotient_sweep.cpp, seconds with
OpenMP): MX round_scale's exponent (mx_exponent) for every finite float32 amax, and standard mode's quotient
(reciprocal_quotient) for every (x, amax) pair of bfloat16 and float16 inputs where the CPU kernel uses it
(about 2e9 pairs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT
from vllm_indexer_epilog import envs


def test_reciprocal_quotient_is_the_correctly_rounded_division(tmp_path: Path) -> None:
    cxx = shutil.which(envs.cxx())
    if cxx is None:
        pytest.skip(f"no C++ compiler ({envs.cxx()}) to build the sweep")
    exe = tmp_path / "quotient_sweep"
    # The kernel's flags that matter for float arithmetic: no contraction, no fast-math; FMA in hardware
    # where the host has it (otherwise fmaf, still exact).
    build = [cxx, "-O2", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-march=native", f"-I{ROOT / 'csrc'}",
             str(Path(__file__).with_name("quotient_sweep.cpp")), "-o", str(exe)]
    subprocess.run(build, check=True, capture_output=True, text=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.endswith(" 0 mismatches") for line in lines), res.stdout
