"""Every golden vector (shared/golden, an independent numpy implementation), byte for byte, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN_FILES, as_bytes, load_golden


def test_golden_vectors_exist() -> None:
    assert len(GOLDEN_FILES) >= 16, f"expected the shared golden vectors, found {len(GOLDEN_FILES)}"


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_bytes(path, backend) -> None:
    _, fn, device = backend
    g = load_golden(path, device)
    fn(g["cache"], g["scale"], g["x"], g["slot_mapping"], quant_mode=g["quant_mode"], round_scale=g["round_scale"])
    np.testing.assert_array_equal(as_bytes(g["cache"]), g["cache_out"].reshape(-1))
    np.testing.assert_array_equal(as_bytes(g["scale"]), g["scale_out"].reshape(-1))
