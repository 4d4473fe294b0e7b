"""The lowering check (scripts/ascend_check.sh): every kernel variant the NPU `triton` backend can launch
compiles for Ascend 950 through triton-ascend and BiShengIR to the HIVM module, the last stage reachable
without CANN. Needs the package registry the first time (its venv is cached); about 7 CPU-minutes (4 to 12 minutes on 2
cores, by load).
Skips only when pip cannot reach the registry."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from vllm_indexer_epilog.op.spec import FP8_FORMATS, GROUP_SIZE, MX_AMAX_FLOOR, NAN_CODE

triton_epilog_jit = pytest.importorskip("vllm_indexer_epilog.backends.triton_epilog_jit")

ROOT = Path(__file__).resolve().parents[2]
_UNREACHABLE = re.compile(r"connection|resolve|network|timed? ?out|unreachable|proxy|ssl|No matching distribution",
                          re.IGNORECASE)


def _driver():
    spec = importlib.util.spec_from_file_location("ascend_lower", ROOT / "scripts" / "ascend_lower.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_driver_constants_match_the_package() -> None:
    """The driver runs where the package cannot be imported; its copies of the constants must agree."""
    d = _driver()
    for name, dtype in (("e4m3fn", "float8_e4m3fn"), ("e5m2", "float8_e5m2")):
        f = next(f for f in FP8_FORMATS.values() if str(f.dtype) == f"torch.{dtype}")
        assert d.FP8[name] == (f.mantissa_bits, f.exponent_bias, f.max_code, f.fmax, f.emax)
    assert (d.NAN_CODE, d.MX_AMAX_FLOOR, d.GROUP) == (NAN_CODE, MX_AMAX_FLOOR, GROUP_SIZE)
    assert d.MAX_DIV_ULPS == triton_epilog_jit.MAX_DIV_ULPS
    names = {(v["quant_mode"], v["x_dtype"], v["slot_dtype"], v["layout"]) for v in d.variants()}
    for quant_mode in (0, 1):
        for x in ("bf16", "fp16"):
            for slot in ("int32", "int64"):
                for layout in ("contiguous", "packed"):
                    assert (quant_mode, x, slot, layout) in names


def _fake_compile(outcomes: list[str]):  # noqa: ANN202
    """A compile_variant stand-in: each call stops at the next stage in `outcomes`, writing the error a crashed
    tool ("crash"), a real compile error ("error") or nothing (reaching hivm) leaves."""
    def compile_variant(v: dict, outdir: str) -> dict:
        outcome = outcomes.pop(0)
        work = Path(outdir) / "v"
        work.mkdir(parents=True, exist_ok=True)
        (work / "error.txt").unlink(missing_ok=True)
        if outcome == "hivm":
            return {"name": "v", "stage": "hivm", "stopped_by": "Cannot find hivmc-a5 under $PATH"}
        text = "Stack dump:\n#0 0x0 (triton-adapter-opt)" if outcome == "crash" else "error: 'tt.load' op bad"
        (work / "error.txt").write_text(text)
        return {"name": "v", "stage": "ttir", "stopped_by": text.splitlines()[-1]}
    return compile_variant


@pytest.mark.parametrize("outcomes, stage, retried", [
    (["hivm"], "hivm", False),
    (["crash", "hivm"], "hivm", True),  # a tool that crashed once gets one more try, and the summary says so
    (["crash", "crash"], "ttir", True),  # ... but only one
    (["error", "hivm"], "ttir", False),  # a compile error is not retried
])
def test_a_crashed_tool_is_retried_once(tmp_path, monkeypatch, outcomes, stage, retried) -> None:
    d = _driver()
    monkeypatch.setattr(d, "compile_variant", _fake_compile(list(outcomes)))
    result = d.compile_with_retry({}, str(tmp_path))
    assert result["stage"] == stage
    assert ("retried_after_tool_crash" in result) == retried


@pytest.mark.network
@pytest.mark.slow
def test_every_variant_lowers_to_hivm(tmp_path) -> None:
    out = tmp_path / "ascend"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "ascend_check.sh"), str(out)], capture_output=True,
                         text=True, timeout=3600)
    if run.returncode == 3 and _UNREACHABLE.search(run.stderr):
        pytest.skip(f"package registry unreachable: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "Ascend950PR_9599"
    assert len(summary["variants"]) == len(_driver().variants())
    for v in summary["variants"]:
        assert v["stage"] == "hivm", v
        ir = (out / v["ir"]).read_text()
        assert "hivm" in ir and v["ir"].endswith("module.hivm.opt.mlir")
        # The kernel's only float arithmetic on the vector unit is the corrected division.
        assert set(v["hivm_float_ops"]) <= {"vdiv.s.x", "vdups.z", "vdup.z", "vldsx1.v64f32"}, v
        assert "hivmc-a5" in (v["stopped_by"] or ""), v
