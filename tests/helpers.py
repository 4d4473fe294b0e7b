"""Helpers the tests share: golden vectors, poisoned outputs, random inputs, backends, byte comparison and the
one parametrisation of the op's modes and dtypes. Tests import them from here (`from helpers import ...`);
fixtures live in conftest.py and the plugins it names."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton backend runs under its CPU interpreter; must be set before Triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vllm_indexer_epilog  # noqa: E402, F401  (registers the op)
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog  # noqa: E402
from vllm_indexer_epilog.op.spec import SCALE_DTYPE_BY_MODE, num_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

# The golden vectors, by name: a list rather than a glob, so that a missing file fails the tests that loop
# over it (np.load raises) instead of leaving them nothing to loop over.
GOLDEN_NAMES = (
    "d128_paged_bf16_e4m3_mx_floor",
    "d200_fp16_e5m2_standard",
    "d4096_bf16_e4m3_standard",
    "d4096_fp16_e5m2_mx_round",
    *(
        f"special_{x}_{fp8}_{mode}"
        for x in ("bfloat16", "float16")
        for fp8 in ("e4m3fn", "e5m2")
        for mode in ("q0_r0", "q0_r1", "q1_r1")
    ),
)
GOLDEN_FILES = tuple(GOLDEN_DIR / f"{name}.npz" for name in GOLDEN_NAMES)
assert len(GOLDEN_FILES) == 16

Backend = Callable[..., None]


def op_backend(*args: object, **kwargs: object) -> None:
    torch.ops.custom.indexer_compress_epilog(*args, **kwargs)


def cpu_kernel_backend(*args: object, **kwargs: object) -> None:
    """The op on CPU, which must have run the compiled C++ kernel: without one the op would quietly run the
    torch reference, and every `cpu_kernel` test would then be testing the reference twice."""
    from vllm_indexer_epilog.backends import cpu

    torch.ops.custom.indexer_compress_epilog(*args, **kwargs)
    assert cpu.native_kernel_registered(), (
        "the cpu_kernel backend ran without the native C++ kernel registered (could it build? see the log)"
    )


def triton_backend(*args: object, **kwargs: object) -> None:
    from vllm_indexer_epilog.backends.triton_kernel import triton_indexer_compress_epilog

    triton_indexer_compress_epilog(*args, **kwargs)


def available_backends() -> dict[str, tuple[Backend, str]]:
    """name -> (callable, device). The op dispatches by device: CPU kernel here, Triton on CUDA."""
    out: dict[str, tuple[Backend, str]] = {
        "cpu_kernel": (cpu_kernel_backend, "cpu"),
        "reference": (reference_indexer_compress_epilog, "cpu"),
    }
    try:
        import triton  # noqa: F401

        out["triton"] = (triton_backend, "cuda" if torch.cuda.is_available() else "cpu")
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["cuda_op"] = (op_backend, "cuda")
    return out


BACKENDS = available_backends()


def backend_or_skip(name: str) -> tuple[Backend, str]:
    if name not in BACKENDS:
        pytest.skip(f"backend {name} unavailable here")
    return BACKENDS[name]


@dataclass(frozen=True)
class Mode:
    quant_mode: int
    round_scale: bool
    name: str

    def __iter__(self) -> Iterator[int | bool]:
        """`quant_mode, round_scale = mode`: the two keyword arguments of the op."""
        return iter((self.quant_mode, self.round_scale))


MODES = (Mode(1, True, "standard"), Mode(0, True, "mx_ceil"), Mode(0, False, "mx_floor"))
CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dtype_id(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def each(
    *,
    mode: bool = True,
    cache_dtype: bool | Sequence[torch.dtype] = False,
    x_dtype: bool | Sequence[torch.dtype] = False,
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Parametrise a test over the op's modes (argument `mode`: a Mode), FP8 cache dtypes (`cache_dtype`) and
    x dtypes (`x_dtype`); pass a sequence instead of True to restrict one axis."""
    marks = []
    if mode:
        marks.append(pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES]))
    for name, flag, every in (("cache_dtype", cache_dtype, CACHE_DTYPES), ("x_dtype", x_dtype, X_DTYPES)):
        if flag:
            values = every if flag is True else tuple(flag)
            marks.append(pytest.mark.parametrize(name, values, ids=[_dtype_id(v) for v in values]))

    def apply(fn: Callable[..., object]) -> Callable[..., object]:
        for mark in marks:
            fn = mark(fn)
        return fn

    return apply


@contextlib.contextmanager
def flushing_denormals() -> Iterator[None]:
    """This thread under torch.set_flush_denormal(True) (x86 FTZ/DAZ), restored afterwards."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def load_golden(path: Path, device: str = "cpu") -> dict[str, object]:
    z = np.load(path)
    x = torch.from_numpy(z["x_bits"].copy()).view(getattr(torch, str(z["x_dtype"])))
    cache = torch.from_numpy(z["cache_in"].copy()).view(getattr(torch, str(z["cache_dtype"])))
    scale = torch.from_numpy(z["scale_in"].copy())
    if str(z["scale_dtype"]) == "float8_e8m0fnu":
        scale = scale.view(torch.float8_e8m0fnu)
    return {
        "x": x.to(device),
        "cache": cache.to(device),
        "scale": scale.to(device),
        "slot_mapping": torch.from_numpy(z["slot_mapping"].copy()).to(device),
        "quant_mode": int(z["quant_mode"]),
        "round_scale": bool(z["round_scale"]),
        "cache_out": z["cache_out"],
        "scale_out": z["scale_out"].view(np.uint8),
    }


def as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)


def assert_same_bytes(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], msg: str = "") -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(as_bytes(g), as_bytes(w), err_msg=msg)


def poisoned(
    n: int, d: int, cache_dtype: torch.dtype, quant_mode: int, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache and scale filled with random bytes (not zeros: a skipped write must show)."""
    g = torch.Generator().manual_seed(seed)
    sdt = SCALE_DTYPE_BY_MODE[quant_mode]
    cache = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8).view(cache_dtype)
    sbytes = torch.randint(0, 256, (n, num_groups(d) * (4 if sdt == torch.float32 else 1)), generator=g, dtype=torch.uint8)
    return cache.to(device), sbytes.view(sdt).to(device)


SPECIALS = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -1e-8, 6e-5, 65504.0, -3.3895e38)


def random_x(t: int, d: int, dtype: torch.dtype, seed: int, *, specials: int = 0, device: str = "cpu") -> torch.Tensor:
    """Rows with magnitudes over many binades, plus `specials` injected special values."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp2(torch.randint(-20, 20, (t, 1), generator=g).float())
    x = torch.randn(t, d, generator=g) * mags
    if specials and t * d:
        idx = torch.randint(0, t * d, (specials,), generator=g)
        vals = torch.tensor(SPECIALS)[torch.randint(0, len(SPECIALS), (specials,), generator=g)]
        x.view(-1)[idx] = vals
    return x.to(dtype).to(device)


def last_only(slots: torch.Tensor) -> torch.Tensor:
    """The slots with every row that a later row overrides turned into -1 (computed the plain way)."""
    out = slots.clone()
    seen: set[int] = set()
    for r in range(slots.numel() - 1, -1, -1):
        s = int(slots[r])
        if s >= 0 and s in seen:
            out[r] = -1
        seen.add(s)
    return out
