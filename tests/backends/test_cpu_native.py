"""The compiled CPU kernel as the op's own CPU kernel: argument checks in C++ that refuse exactly what the
Python validation refuses (same class, same argument named, nothing written), duplicate slots (the last row
wins, codes and scales together; strict mode refuses), and the library's own entry point."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from typing import Callable

import numpy as np
import pytest
import torch

from helpers import ROOT, as_bytes, last_only, poisoned, random_x
from vllm_indexer_epilog import reference_indexer_compress_epilog
from vllm_indexer_epilog.backends import cpu as cpu_backend

ARG_NAMES = ("indexer_compress_cache", "indexer_compress_scale", "x", "slot_mapping", "quant_mode", "round_scale",
             "scale")
OP = torch.ops.custom.indexer_compress_epilog


@pytest.fixture(scope="module", autouse=True)
def native_kernel() -> None:
    """Builds the kernel if this machine has none cached yet; the first CPU call then registers it."""
    if not cpu_backend.load_cpu_kernel():
        pytest.skip("the CPU kernel cannot be built here")
    cache, scale = poisoned(4, 128, torch.float8_e4m3fn, 1, seed=0)
    OP(cache, scale, torch.ones(1, 128, dtype=torch.bfloat16), torch.tensor([1]))


def test_cpu_kernel_is_registered_from_cpp() -> None:
    assert cpu_backend.native_kernel_registered()
    dump = torch._C._dispatch_dump("custom::indexer_compress_epilog")
    cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU:"))
    assert "indexer_compress_epilog_cpu.cpp" in cpu_line, dump


Args = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, object]]


def _valid(quant_mode: int = 1, d: int = 200, t: int = 5, n: int = 8, slot_dtype: torch.dtype = torch.int64) -> Args:
    cache, scale = poisoned(n, d, torch.uint8 if quant_mode == 2 else torch.float8_e4m3fn, quant_mode, seed=3)
    x = random_x(t, d, torch.bfloat16, seed=4)
    slots = torch.tensor([3, -1, 0, 7, 5][:t], dtype=slot_dtype)
    return cache, scale, x, slots, {"quant_mode": quant_mode, "round_scale": True}


def _inference(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


def _noncontig_rows(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, every other row of a buffer twice as tall."""
    buf = torch.empty((t.shape[0] * 2, *t.shape[1:]), dtype=t.dtype)
    buf[::2] = t
    return buf[::2]


def _replace(i: int, fn: Callable[[torch.Tensor], torch.Tensor], **kw: object) -> Callable[[], Args]:
    def make() -> Args:
        args = list(_valid(**kw))
        args[i] = fn(args[i])
        return tuple(args)  # type: ignore[return-value]

    return make


def _kwargs(**over: object) -> Callable[[], Args]:
    def make() -> Args:
        c, s, x, sl, kw = _valid()
        return c, s, x, sl, {**kw, **over}

    return make


def _aliased(i: int, of: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Args:
    """Valid arguments except that argument `i` is a `dtype` view of argument `of`'s bytes from `offset`."""
    args = list(_valid())
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    args[i] = args[of].view(torch.uint8).reshape(-1)[offset:offset + nbytes].view(dtype).view(shape)
    return tuple(args)  # type: ignore[return-value]


INVALID: dict[str, Callable[[], Args]] = {
    "quant_mode_3": _kwargs(quant_mode=3),
    # HiFloat8: a uint8 cache, float32 scales (validated, never written)
    "hif8_fp8_cache": _replace(0, lambda t: t.view(torch.float8_e4m3fn), quant_mode=2),
    "hif8_e8m0_scale": _replace(1, lambda t: torch.ones(t.shape, dtype=torch.float8_e8m0fnu), quant_mode=2),
    "hif8_scale_g_mismatch": _replace(1, lambda t: torch.zeros(t.shape[0], 3), quant_mode=2),
    "hif8_cache_noncontiguous": _replace(0, _noncontig_rows, quant_mode=2),
    "quant_mode_negative": _kwargs(quant_mode=-1),
    "x_float64": _replace(2, lambda t: t.double()),
    "x_int": _replace(2, lambda t: t.to(torch.int32)),
    "cache_float16": _replace(0, lambda t: t.view(torch.uint8).to(torch.float16)),
    "cache_uint8": _replace(0, lambda t: t.view(torch.uint8)),
    "scale_e8m0_in_standard_mode": _replace(1, lambda t: torch.ones(t.shape, dtype=torch.float8_e8m0fnu)),
    "scale_float32_in_mx_mode": _replace(1, lambda t: torch.ones(t.shape, dtype=torch.float32), quant_mode=0),
    "slots_int16": _replace(3, lambda t: t.to(torch.int16)),
    "slots_float": _replace(3, lambda t: t.float()),
    "cache_noncontiguous": _replace(0, _noncontig_rows),
    "scale_noncontiguous": _replace(1, _noncontig_rows),
    "x_noncontiguous": _replace(2, _noncontig_rows),
    "slots_noncontiguous": _replace(3, lambda t: torch.stack([t, t], 1)[:, 0]),
    "x_transposed": _replace(2, lambda t: t.t().contiguous().t()),
    "x_scalar": _replace(2, lambda t: t[0, 0]),
    "x_d_zero": _replace(2, lambda t: t[:, :0]),
    "cache_d_mismatch": _replace(0, lambda t: t[:, :199].contiguous()),
    "scale_g_mismatch": _replace(1, lambda t: torch.zeros(t.shape[0], 3)),
    "scale_rows_mismatch": _replace(1, lambda t: t[:7].contiguous()),
    "scale_one_row": _replace(1, lambda t: t[:1].contiguous()),
    "slots_short": _replace(3, lambda t: t[:4].contiguous()),
    "slots_long": _replace(3, lambda t: torch.cat([t, t[:1]])),
    "slots_2d_wrong_count": _replace(3, lambda t: torch.zeros(2, 3, dtype=t.dtype)),
    "slot_equal_n": _replace(3, lambda t: torch.tensor([3, -1, 0, 8, 5], dtype=t.dtype)),
    "slot_below_minus_one": _replace(3, lambda t: torch.tensor([3, -2, 0, 7, 5], dtype=t.dtype)),
    "slot_huge_int32": _replace(3, lambda t: torch.tensor([3, -1, 2**31 - 1, 7, 5], dtype=torch.int32)),
    "slot_huge_int64": _replace(3, lambda t: torch.tensor([3, -1, 2**40, 7, 5], dtype=torch.int64)),
    "cache_requires_grad": _replace(0, lambda t: t.requires_grad_()),
    "scale_requires_grad": _replace(1, lambda t: t.requires_grad_()),
    "cache_inference_tensor": _replace(0, _inference),
    "scale_inference_tensor": _replace(1, _inference),
    # aliasing (SPEC "Aliasing"): an output sharing bytes with another argument
    "scale_in_cache": lambda: _aliased(1, 0, 0, torch.float32, (8, 2)),
    "cache_in_x": lambda: _aliased(0, 2, 0, torch.float8_e4m3fn, (8, 200)),
    "scale_in_x": lambda: _aliased(1, 2, 1000, torch.float32, (8, 2)),
    "slots_in_cache": lambda: _aliased(3, 0, 16, torch.int64, (5,)),
    "slots_in_scale": lambda: _aliased(3, 1, 8, torch.int32, (5,)),
}


def _named_argument(exc: BaseException) -> str:
    """The argument a refusal names: the first argument name in its message."""
    msg = str(exc)
    hits = [(m.start(), name) for name in ARG_NAMES for m in re.finditer(rf"\b{name}\b", msg)]
    assert hits, f"no argument named in {msg!r}"
    return min(hits)[1]


def _refusal(fn: Callable[[], None]) -> BaseException:
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", sorted(INVALID))
def test_cpp_checks_match_python_validation(case: str) -> None:
    cache, scale, x, slots, kw = INVALID[case]()
    before = (as_bytes(cache.detach()).copy(), as_bytes(scale.detach()).copy())
    want = _refusal(lambda: reference_indexer_compress_epilog(cache, scale, x, slots, **kw))
    got = _refusal(lambda: OP(cache, scale, x, slots, **kw))
    assert type(got) is type(want), f"C++ raised {type(got).__name__}: {got}; Python {type(want).__name__}: {want}"
    assert _named_argument(got) == _named_argument(want), f"C++: {got}\nPython: {want}"
    np.testing.assert_array_equal(as_bytes(cache.detach()), before[0])
    np.testing.assert_array_equal(as_bytes(scale.detach()), before[1])


def test_inference_tensor_inside_inference_mode_is_accepted() -> None:
    cache, scale, x, slots, kw = _valid()
    cache, scale = _inference(cache), _inference(scale)
    want_c, want_s = cache.clone(), scale.clone()
    with torch.inference_mode():
        OP(cache, scale, x, slots, **kw)
        reference_indexer_compress_epilog(want_c, want_s, x, slots, **kw)
    np.testing.assert_array_equal(as_bytes(cache), as_bytes(want_c))
    np.testing.assert_array_equal(as_bytes(scale), as_bytes(want_s))


# ---- duplicates ------------------------------------------------------------------------------------


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize(
    "d,t,n",
    [
        (128, 2048, 2048),  # bitmap path, 4 tasks of 512 rows: duplicates cross threads
        (4096, 96, 128),  # bitmap path, tasks of 16 rows
        (128, 12, 16),  # T <= 16: pairwise compares
        (128, 40, 64 * 400),  # N >> T: hash path
    ],
)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_duplicates_last_row_wins(two_threads, d: int, t: int, n: int, slot_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(d + t)
    for rep in range(12):
        # Few distinct slots, so most rows collide, some across the thread split; rows of very different
        # magnitudes, so a scale of one row with the codes of another would show.
        distinct = torch.randperm(n, generator=g)[: max(2, t // (2 + rep % 5))]
        slots = distinct[torch.randint(0, distinct.numel(), (t,), generator=g)].to(slot_dtype)
        slots[torch.rand(t, generator=g) < 0.1] = -1
        x = (torch.randn(t, d, generator=g) * torch.logspace(-3, 3, t)[:, None]).to(torch.bfloat16)
        for quant_mode in (1, 0):
            got_c, got_s = poisoned(n, d, torch.float8_e4m3fn, quant_mode, seed=rep)
            want_c, want_s = got_c.clone(), got_s.clone()
            OP(got_c, got_s, x, slots, quant_mode=quant_mode)
            reference_indexer_compress_epilog(want_c, want_s, x, last_only(slots), quant_mode=quant_mode)
            np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c), err_msg=f"rep {rep}")
            np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s), err_msg=f"rep {rep}")


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("d,t", [(128, 9000), (4096, 301), (200, 2500)])
@pytest.mark.parametrize("quant_mode", [1, 0, 2])
def test_every_row_written_once_whatever_the_thread_count(threads: int, d: int, t: int, quant_mode: int) -> None:
    """Rows are split as contiguous stretches and an idle thread takes chunks off the end of another's; with more
    threads than this machine has cores, some start late and their stretches are shared. Every row must still
    be written once, by whichever thread claims it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads * 7 + d + quant_mode)
        n = t + 50
        cache_dtype = torch.uint8 if quant_mode == 2 else torch.float8_e4m3fn
        for rep in range(3):
            slots = torch.randperm(n, generator=g)[:t]
            slots[torch.rand(t, generator=g) < 0.05] = -1
            x = random_x(t, d, torch.bfloat16, seed=rep + d, specials=9)
            got_c, got_s = poisoned(n, d, cache_dtype, quant_mode, seed=rep)
            want_c, want_s = got_c.clone(), got_s.clone()
            OP(got_c, got_s, x, slots, quant_mode=quant_mode)
            reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=quant_mode)
            np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c), err_msg=f"rep {rep}")
            np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s), err_msg=f"rep {rep}")
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("t", [2, 40, 3000])
def test_strict_mode_refuses_duplicates_before_writing(monkeypatch, t: int) -> None:
    monkeypatch.setenv("VLLM_INDEXER_EPILOG_STRICT", "1")
    n = 64 * 400 if t == 40 else 4096
    slots = torch.randperm(n)[:t]
    slots[0] = slots[t - 1]
    x = random_x(t, 128, torch.bfloat16, seed=5)
    cache, scale = poisoned(n, 128, torch.float8_e4m3fn, 1, seed=6)
    before = (as_bytes(cache).copy(), as_bytes(scale).copy())
    with pytest.raises(ValueError, match="^slot_mapping"):
        OP(cache, scale, x, slots)
    np.testing.assert_array_equal(as_bytes(cache), before[0])
    np.testing.assert_array_equal(as_bytes(scale), before[1])
    slots[0] = -1  # skipped rows are not duplicates
    OP(cache, scale, x, slots)
    monkeypatch.setenv("VLLM_INDEXER_EPILOG_STRICT", " 0 ")
    slots[0] = slots[t - 1]
    OP(cache, scale, x, slots)


# ---- the library's own entry point ---------------------------------------------------------------

CARELESS: dict[str, Callable[[], Args]] = {
    "short_slot_mapping": _replace(3, lambda t: t[:2].contiguous()),
    "scale_too_few_rows": _replace(1, lambda t: t[:5].contiguous()),
    "scale_one_row": _replace(1, lambda t: t[:1].contiguous()),
    "slot_out_of_range": _replace(3, lambda t: torch.tensor([3, -1, 0, 1000, 5], dtype=t.dtype)),
    "slot_negative": _replace(3, lambda t: torch.tensor([3, -5, 0, 1, 5], dtype=t.dtype)),
    "cache_noncontiguous": _replace(0, _noncontig_rows),
    "scale_noncontiguous": _replace(1, _noncontig_rows),
    "x_noncontiguous": _replace(2, _noncontig_rows),
    "x_wrong_d": _replace(2, lambda t: t[:, :100].contiguous()),
    "cache_wrong_dtype": _replace(0, lambda t: t.view(torch.uint8)),
    "quant_mode_7": _kwargs(quant_mode=7),
}


# `scale` cannot reach OP under our schema: the private entry (which has it) against the reference.
SCALE_INVALID: dict[str, tuple[int, float]] = {
    "scale_nan": (2, float("nan")),
    "scale_inf": (2, float("inf")),
    "scale_float32_overflow": (2, 3.5e38),
    "scale_in_standard_mode": (1, 2.0),
    "scale_in_mx_mode": (0, 0.5),
}


@pytest.mark.parametrize("case", sorted(SCALE_INVALID))
def test_cpp_scale_checks_match_python_validation(case: str) -> None:
    quant_mode, bad = SCALE_INVALID[case]
    cache, scale, x, slots, kw = _valid(quant_mode)
    before = (as_bytes(cache).copy(), as_bytes(scale).copy())
    want = _refusal(lambda: reference_indexer_compress_epilog(cache, scale, x, slots, **kw, scale=bad))
    got = _refusal(lambda: torch.ops.vllm_indexer_epilog_cpu.quantize_scatter(cache, scale, x, slots, quant_mode,
                                                                              True, bad))
    assert type(got) is type(want), f"C++ raised {type(got).__name__}: {got}; Python {type(want).__name__}: {want}"
    assert _named_argument(got) == _named_argument(want) == "scale", f"C++: {got}\nPython: {want}"
    np.testing.assert_array_equal(as_bytes(cache), before[0])
    np.testing.assert_array_equal(as_bytes(scale), before[1])


@pytest.mark.parametrize("case", sorted(CARELESS))
def test_private_entry_point_checks_everything(case: str) -> None:
    """torch.ops.vllm_indexer_epilog_cpu.quantize_scatter is reachable by anyone: it must refuse what the op
    refuses, before writing."""
    cache, scale, x, slots, kw = CARELESS[case]()
    before = (as_bytes(cache).copy(), as_bytes(scale).copy())
    with pytest.raises((TypeError, ValueError)):
        torch.ops.vllm_indexer_epilog_cpu.quantize_scatter(cache, scale, x, slots, kw["quant_mode"], kw["round_scale"])
    np.testing.assert_array_equal(as_bytes(cache), before[0])
    np.testing.assert_array_equal(as_bytes(scale), before[1])


def test_ascend_schema_gets_the_native_kernel() -> None:
    """Under Ascend's definition (extra `float scale=1.0`), the same boxed C++ kernel serves CPU calls: it
    refuses a scale other than 1.0 outside HiFloat8 mode, and applies it in HiFloat8 mode."""
    schema = (
        "indexer_compress_epilog(Tensor(a!) indexer_compress_cache, Tensor(b!) indexer_compress_scale, "
        "Tensor x, Tensor slot_mapping, *, int quant_mode=1, bool round_scale=True, float scale=1.0) -> ()"
    )
    code = f"SCHEMA = {schema!r}\n" + textwrap.dedent(
        """
        import torch
        lib = torch.library.Library("custom", "DEF")
        lib.define(SCHEMA)
        import vllm_indexer_epilog
        from vllm_indexer_epilog.backends import cpu
        assert cpu.native_kernel_registered()
        dump = torch._C._dispatch_dump("custom::indexer_compress_epilog")
        assert "indexer_compress_epilog_cpu.cpp" in next(l for l in dump.splitlines() if l.startswith("CPU:")), dump
        cache, scale = torch.zeros(4, 128, dtype=torch.float8_e4m3fn), torch.zeros(4, 1)
        x = torch.ones(1, 128, dtype=torch.bfloat16)
        torch.ops.custom.indexer_compress_epilog(cache, scale, x, torch.tensor([2]), scale=1.0)
        assert scale[2, 0].item() == (torch.tensor(1.0) / 448).item()
        for bad, words in ((2.0, "scale must be 1.0 unless quant_mode=2"), (0.5, "scale must be 1.0 unless"),
                           (float("nan"), "scale must be finite")):
            try:
                torch.ops.custom.indexer_compress_epilog(cache, scale, x, torch.tensor([3]), scale=bad)
            except ValueError as e:
                assert words in str(e), e
            else:
                raise AssertionError(bad)
        assert scale[3, 0].item() == 0
        codes, hs = torch.zeros(4, 128, dtype=torch.uint8), torch.full((4, 1), 5.0)
        torch.ops.custom.indexer_compress_epilog(codes, hs, x * 3, torch.tensor([1]), quant_mode=2, scale=0.5)
        assert (codes[1] == 0x0C).all() and (codes[[0, 2, 3]] == 0).all() and (hs == 5.0).all(), codes  # 1.5
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# Strict mode is parsed once, by envs (the kernel asks Python only when a call names one slot twice): the
# compiled kernel and the reference agree on every value. They used to disagree on Unicode and control
# "whitespace", and `no`, `off`, `FALSE` turned strict mode on.
STRICT_VALUES = {
    "1": True, "true": True, "TRUE": True, "yes": True, "on": True, " 1 ": True, "\tYes\n": True,
    "": False, "0": False, "false": False, "FALSE": False, "False": False, "no": False, "off": False, " 0 ": False,
    # not booleans: one warning, then the default (off)
    "0\xa0": False, "\u20030": False, "0\u3000": False, "0\x1f": False, "\x1c0": False, "\x85false": False,
    "maybe": False, "2": False, "1\xa0": False,
}


@pytest.mark.parametrize("value", sorted(STRICT_VALUES), ids=repr)
def test_kernel_and_reference_read_strict_mode_alike(monkeypatch, value: str) -> None:
    monkeypatch.setenv("VLLM_INDEXER_EPILOG_STRICT", value)
    x = random_x(3, 128, torch.bfloat16, seed=5)
    slots = torch.tensor([2, -1, 2])
    outcome = {}
    for name, fn in (("kernel", OP), ("reference", reference_indexer_compress_epilog)):
        cache, scale = poisoned(4, 128, torch.float8_e4m3fn, 1, seed=6)
        try:
            fn(cache, scale, x, slots)
            outcome[name] = False
        except ValueError as exc:
            assert "same cache row twice" in str(exc)
            outcome[name] = True
    assert outcome == {"kernel": STRICT_VALUES[value], "reference": STRICT_VALUES[value]}
