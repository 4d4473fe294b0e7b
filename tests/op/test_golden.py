"""Every golden vector (tests/golden, an independent numpy implementation), byte for byte, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import BACKENDS, GOLDEN_DIR, GOLDEN_FILES, as_bytes, flushing_denormals, load_golden


def test_golden_manifest_is_the_directory() -> None:
    """Every listed file is there, and no vector lies in tests/golden unlisted (and so untested)."""
    missing = [p.name for p in GOLDEN_FILES if not p.is_file()]
    assert not missing, f"golden vectors missing from {GOLDEN_DIR}: {missing}"
    assert sorted(GOLDEN_DIR.glob("*.npz")) == sorted(GOLDEN_FILES)
    assert (GOLDEN_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_bytes(path, backend) -> None:
    _, fn, device = backend
    g = load_golden(path, device)
    fn(g["cache"], g["scale"], g["x"], g["slot_mapping"], quant_mode=g["quant_mode"], round_scale=g["round_scale"])
    np.testing.assert_array_equal(as_bytes(g["cache"]), g["cache_out"].reshape(-1))
    np.testing.assert_array_equal(as_bytes(g["scale"]), g["scale_out"].reshape(-1))


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
@pytest.mark.parametrize("name", ["reference", "cpu_kernel"])
def test_golden_bytes_with_flush_denormal(path, name) -> None:
    """The golden bytes whatever the calling thread's denormal mode (the special_* vectors hold subnormal
    inputs and tiny groups whose standard-mode scale is a float32 subnormal)."""
    fn, device = BACKENDS[name]
    g = load_golden(path, device)
    with flushing_denormals():
        fn(g["cache"], g["scale"], g["x"], g["slot_mapping"], quant_mode=g["quant_mode"], round_scale=g["round_scale"])
    np.testing.assert_array_equal(as_bytes(g["cache"]), g["cache_out"].reshape(-1))
    np.testing.assert_array_equal(as_bytes(g["scale"]), g["scale_out"].reshape(-1))
