"""The registered op: schema, opcheck, torch.compile, T = 0, the compiled kernel, a pre-existing definition."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import ROOT, as_bytes, backend_or_skip, each, poisoned, random_x
from vllm_indexer_epilog import indexer_compress_epilog
from vllm_indexer_epilog.op.schema import SCHEMA

# cann-recipes-infer's definition of the same op: an extra `scale` for its hifloat8 mode.
ASCEND_SCHEMA = (
    "indexer_compress_epilog(Tensor(a!) indexer_compress_cache, Tensor(b!) indexer_compress_scale, "
    "Tensor x, Tensor slot_mapping, *, int quant_mode=1, bool round_scale=True, float scale=1.0) -> ()"
)
EXPECTED_SCHEMA = (
    "custom::indexer_compress_epilog(Tensor(a!) indexer_compress_cache, Tensor(b!) indexer_compress_scale, "
    "Tensor x, Tensor slot_mapping, *, int quant_mode=1, bool round_scale=True) -> ()"
)


def test_schema_is_exactly_the_spec() -> None:
    assert str(torch.ops.custom.indexer_compress_epilog.default._schema) == EXPECTED_SCHEMA
    assert EXPECTED_SCHEMA.endswith(SCHEMA)


def test_cpu_kernel_is_the_compiled_one() -> None:
    from vllm_indexer_epilog.backends.cpu import load_cpu_kernel

    assert load_cpu_kernel(), "the csrc CPU kernel failed to build; see the warning above"
    assert hasattr(torch.ops.vllm_indexer_epilog_cpu, "quantize_scatter")


def _args(quant_mode: int, d: int = 200, t: int = 5, n: int = 8):
    cache, scale = poisoned(n, d, torch.float8_e4m3fn, quant_mode, seed=11)
    x = random_x(t, d, torch.bfloat16, seed=12)
    slots = torch.tensor([3, -1, 0, 7, 5][:t], dtype=torch.int64)
    return cache, scale, x, slots


# opcheck's test_schema compares tensors with torch.allclose, which has no fp8 kernel, so it cannot run
# on this op's caches; test_mutations_match_schema checks the same annotations directly.
OPCHECK_TESTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("quant_mode", [0, 1])
def test_opcheck(quant_mode: int) -> None:
    cache, scale, x, slots = _args(quant_mode)
    torch.library.opcheck(
        torch.ops.custom.indexer_compress_epilog.default,
        (cache, scale, x, slots),
        {"quant_mode": quant_mode, "round_scale": quant_mode == 1},
        test_utils=OPCHECK_TESTS,
    )


def test_mutations_match_schema() -> None:
    """Exactly the two annotated arguments change; x and slot_mapping are only read."""
    args = torch.ops.custom.indexer_compress_epilog.default._schema.arguments
    writes = [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]
    assert writes == ["indexer_compress_cache", "indexer_compress_scale"]
    cache, scale, x, slots = _args(1)
    x0, s0, c0, sc0 = x.clone(), slots.clone(), as_bytes(cache).copy(), as_bytes(scale).copy()
    torch.ops.custom.indexer_compress_epilog(cache, scale, x, slots)
    assert torch.equal(x, x0) and torch.equal(slots, s0)
    assert (as_bytes(cache) != c0).any() and (as_bytes(scale) != sc0).any()


def _compiled_matches_eager(quant_mode: int, backend: str) -> None:
    torch._dynamo.reset()
    # No on-disk Inductor cache: an entry compiled by another process (one that had imported vLLM, see
    # below) would otherwise be reused and hide what this process's Inductor can do.
    no_cache = torch._inductor.config.patch(force_disable_caches=True)

    def write(cache, scale, x, slots):
        y = x * 2  # something around the op, so the graph is more than the call
        torch.ops.custom.indexer_compress_epilog(cache, scale, y, slots, quant_mode=quant_mode, round_scale=True)
        return y.sum()

    cache, scale, x, slots = _args(quant_mode)
    want_c, want_s = cache.clone(), scale.clone()
    write(want_c, want_s, x, slots)
    compiled = torch.compile(write, fullgraph=True, backend=backend)
    with no_cache:
        compiled(cache, scale, x, slots)
    np.testing.assert_array_equal(as_bytes(cache), as_bytes(want_c))
    np.testing.assert_array_equal(as_bytes(scale), as_bytes(want_s))


@pytest.mark.parametrize("quant_mode", [0, 1])
def test_torch_compile_fullgraph_traces(quant_mode: int) -> None:
    """fullgraph=True: the op traces with no graph break (fake kernel), in both modes."""
    _compiled_matches_eager(quant_mode, "aot_eager")


def test_torch_compile_inductor_standard_mode() -> None:
    _compiled_matches_eager(1, "inductor")


def inductor_decomposes_e8m0_mutations() -> bool:
    """Whether Inductor here can write back a mutated float8_e8m0fnu graph input.

    Before torch 2.16 (pytorch/pytorch#196013) Inductor's pattern matcher skips any node with an input
    dtype Inductor does not support, the auto_functionalized_v2 node of a mutated e8m0 tensor included,
    so it is never decomposed ("auto_functionalized_v2 was not removed"), whatever the op. vLLM backports
    the fix to older torch when it is imported (`vllm/env_override.py`, `_patch_inductor_pattern_matcher`,
    in vllm 0.32.0 among others), which makes the same compile succeed in a process that imported vllm.
    """
    return torch.__version__ >= "2.16" or "vllm.env_override" in sys.modules


def test_torch_compile_inductor_mx_mode(request: pytest.FixtureRequest) -> None:
    if not inductor_decomposes_e8m0_mutations():
        from torch._inductor.exc import InductorError

        request.applymarker(pytest.mark.xfail(
            strict=True, raises=InductorError,
            reason="torch < 2.16 without vLLM's backport: Inductor cannot write back a mutated float8_e8m0fnu "
            "graph input (pytorch/pytorch#196013); MX scales as graph inputs need backend='aot_eager'",
        ))
    _compiled_matches_eager(0, "inductor")


def test_torch_compile_inductor_mx_mode_after_importing_vllm() -> None:
    """The same compile in a process that imported vLLM (its pattern-matcher backport): it works."""
    # find_spec, not importorskip: importing vLLM here would patch Inductor for every later test.
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed")
    code = textwrap.dedent(
        """
        import vllm  # noqa: F401  (applies vLLM's Inductor pattern-matcher backport)
        import torch, numpy as np, vllm_indexer_epilog
        torch._inductor.config.force_disable_caches = True
        def write(cache, scale, x, slots):
            y = x * 2
            torch.ops.custom.indexer_compress_epilog(cache, scale, y, slots, quant_mode=0, round_scale=True)
            return y.sum()
        cache = torch.zeros(8, 200, dtype=torch.float8_e4m3fn)
        scale = torch.zeros(8, 2, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        x, slots = torch.randn(5, 200, dtype=torch.bfloat16), torch.tensor([3, -1, 0, 7, 5])
        want_c, want_s = cache.clone(), scale.clone()
        write(want_c, want_s, x, slots)
        torch.compile(write, fullgraph=True, backend="inductor")(cache, scale, x, slots)
        assert torch.equal(cache.view(torch.uint8), want_c.view(torch.uint8))
        assert torch.equal(scale.view(torch.uint8), want_s.view(torch.uint8))
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=500)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_fake_tensor_validates_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cache = torch.empty(8, 128, dtype=torch.float8_e4m3fn)
        scale = torch.empty(8, 2, dtype=torch.float32)  # G should be 1
        with pytest.raises(ValueError, match="indexer_compress_scale must have shape"):
            torch.ops.custom.indexer_compress_epilog(cache, scale, torch.empty(2, 128), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("backend_name", ["cpu_kernel", "reference", "triton"])
def test_zero_rows(backend_name: str) -> None:
    fn, device = backend_or_skip(backend_name)
    cache, scale = poisoned(8, 300, torch.float8_e5m2, 0, seed=1, device=device)
    before = (as_bytes(cache).copy(), as_bytes(scale).copy())
    x = torch.empty(0, 300, dtype=torch.float16, device=device)
    fn(cache, scale, x, torch.empty(0, dtype=torch.int32, device=device), quant_mode=0, round_scale=False)
    np.testing.assert_array_equal(as_bytes(cache), before[0])
    np.testing.assert_array_equal(as_bytes(scale), before[1])


def test_leading_dims_and_paged_cache() -> None:
    """x [B, S, d] and a [blocks, block_size, 1, d] cache are just rows."""
    d = 128
    cache, scale = poisoned(64, d, torch.float8_e4m3fn, 1, seed=2)
    x = random_x(12, d, torch.bfloat16, seed=3)
    slots = torch.randperm(64)[:12]
    want_c, want_s = cache.clone(), scale.clone()
    indexer_compress_epilog(want_c, want_s, x, slots)
    indexer_compress_epilog(cache.view(4, 16, 1, d), scale.view(4, 16, 1, 1), x.view(3, 4, d), slots.view(3, 4))
    np.testing.assert_array_equal(as_bytes(cache), as_bytes(want_c))
    np.testing.assert_array_equal(as_bytes(scale), as_bytes(want_s))


def test_public_wrapper_equals_op() -> None:
    cache, scale, x, slots = _args(1)
    c2, s2 = cache.clone(), scale.clone()
    indexer_compress_epilog(cache, scale, x, slots, quant_mode=1, round_scale=True)
    torch.ops.custom.indexer_compress_epilog(c2, s2, x, slots)
    assert torch.equal(cache.view(torch.uint8), c2.view(torch.uint8)) and torch.equal(scale, s2)


def test_existing_ascend_style_definition_is_kept() -> None:
    """If custom::indexer_compress_epilog exists first (Ascend's custom_ops, with its extra `scale`
    argument), importing us neither crashes nor redefines it, and our CPU kernel serves it (its `scale`
    only in HiFloat8 mode: tests/op/test_hifloat8_op.py)."""
    code = f"ASCEND_SCHEMA = {ASCEND_SCHEMA!r}\n" + textwrap.dedent(
        """
        import torch
        lib = torch.library.Library("custom", "DEF")
        lib.define(ASCEND_SCHEMA)
        import vllm_indexer_epilog
        from vllm_indexer_epilog.op import registration, schema
        assert not schema.defined_here()
        found = str(torch.ops.custom.indexer_compress_epilog.default._schema)
        assert "float scale=1." in found, found
        cache = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
        scale = torch.zeros(4, 1)
        x = torch.ones(2, 128, dtype=torch.bfloat16)
        torch.ops.custom.indexer_compress_epilog(cache, scale, x, torch.tensor([1, 2]))
        assert scale[1, 0].item() == (torch.tensor(1.0) / 448).item()
        try:
            torch.ops.custom.indexer_compress_epilog(cache, scale, x, torch.tensor([1, 2]), scale=2.0)
        except ValueError as e:
            assert "scale must be 1.0 unless quant_mode=2" in str(e), e  # HiFloat8's multiplier only
        else:
            raise AssertionError("scale=2.0 accepted")
        import importlib; importlib.reload(registration); registration.register()  # idempotent, still no crash
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@each()
def test_cpu_kernel_ignores_flush_denormal(mode) -> None:
    """torch.set_flush_denormal(True) sets FTZ/DAZ for this thread; the kernel pins IEEE behaviour for its
    own arithmetic, so subnormal inputs and quotients still give the contract's bytes."""
    quant_mode, round_scale = mode
    g = torch.Generator().manual_seed(21)
    # bf16 values down to the float32 subnormal range, and groups whose scales are tiny.
    x = (torch.randn(64, 256, generator=g) * torch.exp2(-torch.randint(100, 140, (64, 1), generator=g).float()))
    x = x.to(torch.bfloat16)
    slots = torch.randperm(64, generator=g)
    cache, scale = poisoned(64, 256, torch.float8_e4m3fn, quant_mode, seed=22)
    want_c, want_s = cache.clone(), scale.clone()
    from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

    reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        torch.ops.custom.indexer_compress_epilog(cache, scale, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(as_bytes(cache), as_bytes(want_c))
    np.testing.assert_array_equal(as_bytes(scale), as_bytes(want_s))


def test_ascend_custom_ops_imported_first(tmp_path) -> None:
    """With torch_npu installed, importing us first must still let Ascend's custom_ops define the op
    (a stand-in package that defines it the way a TORCH_LIBRARY DEF would: failing if it exists)."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("# stand-in: only its presence matters here\n")
    (tmp_path / "custom_ops").mkdir()
    (tmp_path / "custom_ops" / "__init__.py").write_text(f"ASCEND_SCHEMA = {ASCEND_SCHEMA!r}\n" + textwrap.dedent(
        """
        import torch
        _lib = torch.library.Library("custom", "DEF")  # raises if the op already exists
        _lib.define(ASCEND_SCHEMA)
        LOADED = True
        """
    ))
    code = textwrap.dedent(
        """
        import torch, vllm_indexer_epilog, custom_ops
        from vllm_indexer_epilog.op import registration, schema
        assert custom_ops.LOADED and not schema.defined_here()
        assert "float scale=1." in str(torch.ops.custom.indexer_compress_epilog.default._schema)
        cache, scale = torch.zeros(4, 128, dtype=torch.float8_e4m3fn), torch.zeros(4, 1)
        torch.ops.custom.indexer_compress_epilog(cache, scale, torch.ones(1, 128, dtype=torch.bfloat16), torch.tensor([2]))
        assert scale[2, 0].item() > 0
        print("OK")
        """
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
