"""The committed golden outputs are what tests/golden/generate.py (numpy + ml_dtypes, written from docs/SPEC.md)
computes from the committed inputs, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import GOLDEN_FILES

# The test extra installs it (scripts/env.sh); scripts/gpu_check.sh runs on a machine as it comes, without it.
pytest.importorskip("ml_dtypes")
from golden import generate  # noqa: E402


def test_generator_covers_every_golden_file() -> None:
    assert sorted(generate.golden_files()) == sorted(GOLDEN_FILES)


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_generator_reproduces_committed_outputs(path: Path) -> None:
    assert generate.differences(path) == [], f"run `python tests/golden/generate.py` for {path.name}"
    with np.load(path) as z:  # the vector writes something, so reproducing it is not vacuous
        assert z["cache_out"].tobytes() != z["cache_in"].tobytes()
