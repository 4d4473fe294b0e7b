"""Fixtures shared by every test directory. Helpers live in tests/helpers.py; the stand-in NPU layer's
fixtures (`boot`) come from the plugin below, so test modules use them without importing them."""

from __future__ import annotations

import pytest

import helpers
from helpers import BACKENDS, Backend

pytest_plugins = ["fakes.ascend_standin"]

# Test modules of the CPU-kernel work still import these from conftest; new code imports helpers.
from helpers import GOLDEN_FILES, ROOT, as_bytes, load_golden, poisoned, random_x  # noqa: E402, F401


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> tuple[str, Backend, str]:
    """(name, callable, device) for every backend available here (helpers.BACKENDS)."""
    fn, device = helpers.BACKENDS[request.param]
    return request.param, fn, device
