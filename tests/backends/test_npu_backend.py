"""The NPU backend choice (backends/npu.py): which implementation serves which call, the override, logging once,
and the mapping onto Ascend's compiled ops. CPU tensors stand in for NPU tensors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fakes.ascend_standin import CUSTOM_OPS_DIR, FAKE_DIR, carve_packed, expected_packed
from helpers import ROOT, poisoned, random_x
from vllm_indexer_epilog.backends import npu as npu_backend
from vllm_indexer_epilog import envs
from vllm_indexer_epilog.backends.npu import NpuBackend, write_packed, write_split
from vllm_indexer_epilog.op.reference import mx_exponent, standard_scale
from vllm_indexer_epilog.op.spec import FP8_FORMATS


# The Triton kernel is the NPU backend's exact compiled path; on the stand-in (CPU tensors) it runs under Triton's
# interpreter, where that is on (tests/helpers.py turns it on without a GPU).
TRITON_OR_REFERENCE = (
    NpuBackend.TRITON if npu_backend.why_not_triton(torch.device("cpu")) is None else NpuBackend.REFERENCE
)


def _spec(standin, scale_dtype=torch.float32, bs=8, dtype=torch.float8_e4m3fn):
    return standin.indexer.AscendMLAAttentionSpec(bs, 1, 128, dtype, 1, scale_dtype)


def _slots(t, n, seed=0):
    s = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:t]
    s[::3] = -1
    return s


@pytest.mark.parametrize(
    ("x_dtype", "cache_dtype", "scale_dtype", "quant_mode", "want"),
    [
        (torch.bfloat16, torch.float8_e4m3fn, torch.float32, 1, NpuBackend.C_ASCEND_V2),
        (torch.float16, torch.float8_e4m3fn, torch.float32, 1, NpuBackend.C_ASCEND_V2),
        (torch.float32, torch.float8_e4m3fn, torch.float32, 1, TRITON_OR_REFERENCE),
        (torch.bfloat16, torch.float8_e5m2, torch.float32, 1, TRITON_OR_REFERENCE),
        (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e8m0fnu, 0, TRITON_OR_REFERENCE),
    ],
)
def test_packed_writes_choose_v2_only_where_it_fits(boot, x_dtype, cache_dtype, scale_dtype, quant_mode, want) -> None:
    standin = boot("A5")
    cache = carve_packed(_spec(standin, scale_dtype, dtype=cache_dtype), 4, pad=16)
    x = random_x(20, 128, x_dtype, 1, specials=3)
    slots = _slots(20, 32)
    expect = expected_packed(cache, x, slots, quant_mode, True)
    assert write_packed(cache.values, cache.scales, x, slots, quant_mode=quant_mode) is want
    assert len(standin.v2_calls) == (want is NpuBackend.C_ASCEND_V2)
    assert torch.equal(cache.raw, expect)


def test_without_compiled_ops_everything_is_the_reference(boot, monkeypatch) -> None:
    standin = boot("A5")
    monkeypatch.setattr(npu_backend, "c_ascend_v2_installed", lambda: False)
    monkeypatch.setattr(npu_backend, "why_not_triton", lambda device: "no Triton here")
    cache = carve_packed(_spec(standin), 2)
    x, slots = random_x(10, 128, torch.bfloat16, 2), _slots(10, 16)
    expect = expected_packed(cache, x, slots, 1, True)
    assert write_packed(cache.values, cache.scales, x, slots) is NpuBackend.REFERENCE
    assert torch.equal(cache.raw, expect) and standin.v2_calls == []
    k, s = poisoned(16, 128, torch.float8_e4m3fn, 1, 3)
    assert write_split(k, s, x, slots) is NpuBackend.REFERENCE  # our own definition: no Ascend op


def test_choice_is_logged_once_per_reason(boot, caplog) -> None:
    standin = boot("A5")
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    cache = carve_packed(_spec(standin), 2)
    for _ in range(3):
        write_packed(cache.values, cache.scales, random_x(4, 128, torch.bfloat16, 0), _slots(4, 16))
    write_packed(cache.values, cache.scales, random_x(4, 128, torch.float32, 0), _slots(4, 16))
    lines = [r.getMessage() for r in caplog.records if "NPU packed-cache" in r.getMessage()]
    assert len(lines) == 2 and "c_ascend_v2 (fits)" in lines[0] and "float16/bfloat16" in lines[1]


@pytest.mark.parametrize(
    ("value", "layout", "error"),
    [
        ("bogus", "packed", "expected auto"),
        ("custom_ops", "packed", "cannot serve the packed"),
        ("c_ascend_v2", "split", "cannot serve the split"),
        ("custom_ops", "split", "not installed"),
    ],
)
def test_forced_backend_that_cannot_serve_is_an_error(boot, monkeypatch, value, layout, error) -> None:
    standin = boot("A5")
    monkeypatch.setenv(envs.NPU_BACKEND, value)
    cache = carve_packed(_spec(standin), 2)
    before = cache.raw.clone()
    x, slots = random_x(4, 128, torch.bfloat16, 0), _slots(4, 16)
    with pytest.raises((RuntimeError, ValueError), match=error):
        if layout == "packed":
            write_packed(cache.values, cache.scales, x, slots)
        else:
            write_split(cache.values.reshape(16, 128), cache.scales.reshape(16, 1).contiguous(), x, slots)
    assert torch.equal(cache.raw, before)


def test_forced_reference_pins_the_exact_path(boot, monkeypatch) -> None:
    standin = boot("A5")
    monkeypatch.setenv(envs.NPU_BACKEND, "reference")
    cache = carve_packed(_spec(standin), 2)
    assert write_packed(cache.values, cache.scales, random_x(4, 128, torch.bfloat16, 0), _slots(4, 16)) is NpuBackend.REFERENCE
    assert standin.v2_calls == []


def test_ascend_custom_op_serves_split_writes_mapped_onto_its_schema(tmp_path) -> None:
    """With cann-recipes-infer's custom_ops installed (a stand-in, defined before our package as on an NPU
    machine), standard-mode split writes go to it with int32 slots and its `scale` left at 1.0; float32 x
    cannot. MX never goes to custom_ops in auto (issue 16: its MX is not SPEC-exact): it takes the Triton
    kernel (issue 17; under the interpreter here), or the reference where Triton cannot launch; so does
    float32 x."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path[:0] = [{str(FAKE_DIR)!r}, {str(CUSTOM_OPS_DIR)!r}, {str(ROOT / "tests")!r}]
        import vllm_indexer_epilog
        import custom_ops
        from vllm_indexer_epilog.backends import npu as npu_backend
        from vllm_indexer_epilog.op import registration, schema
        from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog
        from helpers import poisoned, random_x
        assert not schema.defined_here() and npu_backend.ascend_custom_op_installed()
        TR = "triton" if npu_backend.why_not_triton(torch.device("cpu")) is None else "reference"
        for x_dtype, quant_mode, want, calls in ((torch.bfloat16, 1, "custom_ops", 1), (torch.float16, 0, TR, 1),
                                                 (torch.float32, 1, TR, 1)):
            k, s = poisoned(64, 128, torch.float8_e4m3fn, quant_mode, 1)
            wk, ws = k.clone(), s.clone()
            x = random_x(24, 128, x_dtype, 2, specials=4)
            slots = torch.randperm(64)[:24]
            slots[::4] = -1
            slots[1] = 64  # out of range: must become a skipped row, never a write
            got = npu_backend.write_split(k, s, x, slots, quant_mode=quant_mode, round_scale=False)
            assert got.value == want, got
            assert len(custom_ops.CALLS) == calls
            if want == "custom_ops":
                call = custom_ops.CALLS[-1]
                assert call["slots"].dtype == torch.int32 and call["slots"][1] == -1 and call["scale"] == 1.0
                assert call["quant_mode"] == quant_mode and call["round_scale"] is False
            guarded = torch.where(slots < 64, slots, -1)
            reference_indexer_compress_epilog(wk, ws, x, guarded, quant_mode=quant_mode, round_scale=False)
            assert torch.equal(k.view(torch.uint8), wk.view(torch.uint8)) and torch.equal(s.view(torch.uint8), ws.view(torch.uint8))
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def _run_with_custom_ops(body: str) -> None:
    """Runs `body` in a fresh interpreter where the custom_ops stand-in defined the op before our package."""
    script = textwrap.dedent(
        f"""
        import logging, os, sys, torch
        sys.path[:0] = [{str(FAKE_DIR)!r}, {str(CUSTOM_OPS_DIR)!r}, {str(ROOT / "tests")!r}]
        import vllm_indexer_epilog
        import custom_ops
        from vllm_indexer_epilog import envs
        from vllm_indexer_epilog.backends import npu as npu_backend
        from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog
        from helpers import poisoned, random_x
        assert npu_backend.ascend_custom_op_installed()
        LOG = []
        class _Keep(logging.Handler):
            def emit(self, record):
                LOG.append(record.getMessage())
        logging.getLogger("vllm_indexer_epilog").addHandler(_Keep())
        logging.getLogger("vllm_indexer_epilog").setLevel(logging.INFO)
        def same(a, b):
            return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        """
    ) + textwrap.dedent(body) + "\nprint('ok')\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_INDEXER_EPILOG_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_mx_goes_to_custom_ops_only_by_name() -> None:
    """Issue 16, item 3: in auto, MX (either round_scale) never takes custom_ops even where it fits: the Triton
    kernel (issue 17) where it can launch, else the SPEC-exact reference with one log line naming why;
    VLLM_INDEXER_EPILOG_NPU_BACKEND=custom_ops sends MX there, with one log line saying it is not SPEC-exact."""
    _run_with_custom_ops(
        """
        TR = "triton" if npu_backend.why_not_triton(torch.device("cpu")) is None else "reference"
        x = random_x(12, 256, torch.bfloat16, 5, specials=2)
        slots = torch.arange(12) * 2
        for _ in range(2):
            for rs in (True, False):
                k, s = poisoned(32, 256, torch.float8_e4m3fn, 0, 1)
                wk, ws = k.clone(), s.clone()
                got = npu_backend.write_split(k, s, x, slots, quant_mode=0, round_scale=rs)
                assert got.value == TR and custom_ops.CALLS == [], got
                reference_indexer_compress_epilog(wk, ws, x, slots, quant_mode=0, round_scale=rs)
                assert same(k, wk) and same(s, ws)
        if TR == "triton":
            auto = [m for m in LOG if "use triton (" in m]
            assert len(auto) == 1 and "SPEC-exact compiled path" in auto[0], LOG
        else:
            auto = [m for m in LOG if "not SPEC-exact" in m]
            assert len(auto) == 1 and "use reference (" in auto[0] and "docs/ascend-kernel.md" in auto[0], LOG
        # Standard mode is unchanged: custom_ops in auto.
        k, s = poisoned(32, 256, torch.float8_e4m3fn, 1, 1)
        assert npu_backend.write_split(k, s, x, slots).value == "custom_ops" and len(custom_ops.CALLS) == 1

        os.environ[envs.NPU_BACKEND] = "custom_ops"
        for _ in range(2):
            k, s = poisoned(32, 256, torch.float8_e5m2, 0, 1)
            assert npu_backend.write_split(k, s, x, slots, quant_mode=0).value == "custom_ops"
        assert [c["quant_mode"] for c in custom_ops.CALLS] == [1, 0, 0]
        forced = [m for m in LOG if "not SPEC-exact" in m and "forced" in m]
        assert len(forced) == 1 and "use custom_ops (" in forced[0], LOG
        """
    )


def test_int64_slots_reach_compiled_ops_as_int32_without_wrapping() -> None:
    """vLLM's int64 slots are narrowed to int32 for custom_ops after the range guard: 2^32 + 5 would wrap to 5
    and 2^31 to -2^31 under a bare cast; here both become -1, and row 5's write is the one row that names 5.
    Strict mode refuses them by name (slot_mapping) before anything is written or called."""
    _run_with_custom_ops(
        """
        x = random_x(5, 128, torch.float16, 7)
        slots = torch.tensor([5, 2**32 + 5, 2**31, -1, 7], dtype=torch.int64)
        k, s = poisoned(16, 128, torch.float8_e4m3fn, 1, 2)
        wk, ws = k.clone(), s.clone()
        assert npu_backend.write_split(k, s, x, slots).value == "custom_ops"
        call = custom_ops.CALLS[-1]
        assert call["slots"].dtype == torch.int32 and call["slots"].tolist() == [5, -1, -1, -1, 7]
        reference_indexer_compress_epilog(wk, ws, x, torch.tensor([5, -1, -1, -1, 7]))
        assert same(k, wk) and same(s, ws)

        os.environ[envs.STRICT] = "1"
        before_k, before_s, calls = k.clone(), s.clone(), len(custom_ops.CALLS)
        for bad in (2**31, 2**32 + 5, -2):
            try:
                npu_backend.write_split(k, s, x, torch.tensor([0, bad, 1, 2, 3], dtype=torch.int64))
            except ValueError as e:
                assert "slot_mapping" in str(e), e
            else:
                raise AssertionError(f"slot {bad} accepted in strict mode")
        assert same(k, before_k) and same(s, before_s) and len(custom_ops.CALLS) == calls
        """
    )


def test_int32_narrowing_refuses_caches_int32_cannot_address() -> None:
    with pytest.raises(ValueError, match="slot_mapping: int32 slots cannot address"):
        npu_backend._int32_slots(torch.zeros(2, dtype=torch.int64), 2**31 + 1)
    got = npu_backend._int32_slots(torch.tensor([2**31 - 1, 2**31, -1, -5], dtype=torch.int64), 2**31)
    assert got.dtype == torch.int32 and got.tolist() == [2**31 - 1, -1, -1, -1]


def test_packed_v2_gets_int32_slots_without_wrapping(boot) -> None:
    standin = boot("A5")
    cache = carve_packed(_spec(standin), 4, pad=16)
    x = random_x(6, 128, torch.bfloat16, 4)
    slots = torch.tensor([3, 2**32 + 3, 9, -1, 2**31, 30], dtype=torch.int64)
    guarded = torch.tensor([3, -1, 9, -1, -1, 30])
    expect = expected_packed(cache, x, guarded, 1, True)
    assert write_packed(cache.values, cache.scales, x, slots) is NpuBackend.C_ASCEND_V2
    call = standin.v2_calls[-1]
    assert call["slots"].dtype == torch.int32 and call["slots"].tolist() == guarded.tolist()
    assert torch.equal(cache.raw, expect)


def test_split_writes_validate_like_every_backend(boot) -> None:
    boot("A5")
    k, s = poisoned(16, 128, torch.float8_e4m3fn, 1, 3)
    before = k.clone()
    with pytest.raises(ValueError, match="indexer_compress_cache must be contiguous"):
        write_split(k.t().contiguous().t(), s, random_x(4, 128, torch.bfloat16, 0), _slots(4, 16))
    with pytest.raises(TypeError, match="slot_mapping"):
        write_split(k, s, random_x(4, 128, torch.bfloat16, 0), _slots(4, 16).float())
    assert torch.equal(k.view(torch.uint8), before.view(torch.uint8))


def test_package_scales_against_the_compiled_ascend_rule() -> None:
    """The package's scale functions (what the reference and so every NPU fallback writes) against the rule
    both Ascend C kernels (cann-recipes-infer's and vllm-ascend's v2) use: a * fl(1/448), the reciprocal
    stored as 0x3b124925, where SPEC.md asks for fl(a/448). Over every finite positive bfloat16 amax:
    the package's standard scale is the correctly rounded quotient; the Ascend rule differs from it, by one
    ulp, for 53.5 % of them (docs/ascend-kernel.md's table has it per x dtype and format); MX (round_scale)
    exponents never differ from the ceil rule the kernel *intends*. As written, cann-recipes' kernel bumps
    exact powers of two too (142 bfloat16 amax values; tests/op/test_ascend_kernel_model.py)."""
    fmt = FP8_FORMATS[torch.float8_e4m3fn]
    a = torch.arange(1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    a = a[torch.isfinite(a) & (a > 0)]
    ours = standard_scale(a, fmt)
    exact = torch.from_numpy((a.double().numpy() / 448.0).astype(np.float32)).view(torch.int32)
    assert torch.equal(ours, exact)
    inv = torch.tensor([0x3B124925], dtype=torch.int32).view(torch.float32)
    assert inv.item() == torch.tensor(1 / 448, dtype=torch.float32).item()  # it is the rounded reciprocal
    ascend = (a * inv).view(torch.int32)
    differ = (ascend != ours).double().mean().item()
    assert round(differ * 100, 1) == 53.5
    assert (ascend - ours).abs().max().item() == 1

    def ascend_ceil_exponent(amax: torch.Tensor) -> torch.Tensor:
        bits = (amax.clamp(min=1e-4) * inv).view(torch.int32)
        return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).int()

    assert torch.equal(mx_exponent(a, fmt, round_scale=True), ascend_ceil_exponent(a))


def test_hifloat8_goes_to_custom_ops_only_by_name() -> None:
    """Issue 16 item 1: custom_ops' HiFloat8 cast saturates, so in auto quant_mode=2 takes the reference (one
    log line saying why); named, custom_ops gets int32 slots, its `scale`, and a scratch scale tensor, so the
    caller's stays untouched (the Ascend kernel copies an unwritten buffer there)."""
    _run_with_custom_ops(
        """
        x = random_x(12, 256, torch.bfloat16, 5, specials=2)
        slots = torch.arange(12) * 2
        slots[3] = -1
        for _ in range(2):
            k, s = poisoned(32, 256, torch.uint8, 2, 1)
            wk, ws = k.clone(), s.clone()
            assert npu_backend.write_split(k, s, x, slots, quant_mode=2, scale=0.25).value == "reference"
            assert custom_ops.CALLS == []
            reference_indexer_compress_epilog(wk, ws, x, slots, quant_mode=2, scale=0.25)
            assert same(k, wk) and same(s, ws)
        auto = [m for m in LOG if "saturates" in m]
        assert len(auto) == 1 and "use reference (" in auto[0], LOG

        os.environ[envs.NPU_BACKEND] = "custom_ops"
        k, s = poisoned(32, 256, torch.uint8, 2, 1)
        wk, ws = k.clone(), s.clone()
        assert npu_backend.write_split(k, s, x, slots, quant_mode=2, scale=0.25).value == "custom_ops"
        call = custom_ops.CALLS[-1]
        assert call["quant_mode"] == 2 and call["scale"] == 0.25 and call["slots"].dtype == torch.int32
        reference_indexer_compress_epilog(wk, ws, x, slots, quant_mode=2, scale=0.25)
        assert same(k, wk) and same(s, ws)
        assert any("saturates" in m and "forced" in m for m in LOG), LOG
        """
    )
