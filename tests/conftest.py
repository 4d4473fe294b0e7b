"""Fixtures shared by every test directory. Helpers live in tests/helpers.py; the stand-in NPU layer's
fixtures (`boot`) come from the plugin below, so test modules use them without importing them."""

from __future__ import annotations

import pytest

import helpers
from helpers import BACKENDS, Backend

pytest_plugins = ["fakes.ascend_standin"]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> tuple[str, Backend, str]:
    """(name, callable, device) for every backend available here (helpers.BACKENDS)."""
    fn, device = helpers.BACKENDS[request.param]
    return request.param, fn, device
