"""Shared test helpers: golden vectors, poisoned outputs, backends, byte comparison."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton backend runs under its CPU interpreter; must be set before Triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vllm_indexer_epilog  # noqa: E402  (registers the op)
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog  # noqa: E402
from vllm_indexer_epilog.op.spec import SCALE_DTYPE_BY_MODE, num_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*.npz"))

Backend = Callable[..., None]


def op_backend(*args: object, **kwargs: object) -> None:
    torch.ops.custom.indexer_compress_epilog(*args, **kwargs)


def triton_backend(*args: object, **kwargs: object) -> None:
    from vllm_indexer_epilog.backends.triton_kernel import triton_indexer_compress_epilog

    triton_indexer_compress_epilog(*args, **kwargs)


def available_backends() -> dict[str, tuple[Backend, str]]:
    """name -> (callable, device). The op dispatches by device: CPU kernel here, Triton on CUDA."""
    out: dict[str, tuple[Backend, str]] = {
        "cpu_kernel": (op_backend, "cpu"),
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


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> tuple[str, Backend, str]:
    fn, device = BACKENDS[request.param]
    return request.param, fn, device


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


def poisoned(n: int, d: int, cache_dtype: torch.dtype, quant_mode: int, seed: int, device: str = "cpu"):
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
