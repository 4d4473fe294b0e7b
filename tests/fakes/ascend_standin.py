"""Boots the stand-in NPU layer (tests/fakes/npu) with the plugin's hooks installed, and carves packed caches
the way vllm-ascend's model runner does (one raw page per block; values, scales and whole-block views).

A pytest plugin (tests/conftest.py names it in `pytest_plugins`): its `boot` fixture reaches every test."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from fakes.npu_ops import define_indexer_compress_epilog_v2

FAKE_DIR = Path(__file__).resolve().parent / "npu"
CUSTOM_OPS_DIR = Path(__file__).resolve().parent / "npu_custom_ops"
_FAKE_MODULES = ("torch_npu", "vllm_ascend")
V2_CALLS: list[dict] = []  # what _C_ascend.indexer_compress_epilog_v2 was called with (fakes/npu_ops.py)


def _forget_fakes() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _FAKE_MODULES:
            del sys.modules[name]


def vllm_config(flag: Any = None, *, where: str = "model", block_size: int = 16) -> SimpleNamespace:
    """A stand-in VllmConfig carrying the `indexer_epilog` flag in the model config or --additional-config."""
    hf = SimpleNamespace(**({"indexer_epilog": flag} if flag is not None and where == "model" else {}))
    additional = {"indexer_epilog": flag} if flag is not None and where == "additional" else {}
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), additional_config=additional,
                           cache_config=SimpleNamespace(block_size=block_size))


@dataclass
class Standin:
    torch_npu: ModuleType
    utils: ModuleType
    device_op: ModuleType
    indexer: ModuleType
    sfa: ModuleType
    v2_calls: list

    def calls(self, name: str) -> list[dict]:
        return [kw for n, kw in self.torch_npu.CALLS if n == name]


@pytest.fixture
def boot(monkeypatch: pytest.MonkeyPatch):
    """boot(device="A5") -> Standin: fresh stand-in modules for that device, plugin registered.

    As in vLLM, the plugin registers before vllm-ascend imports its attention and model modules, so the
    hooks install on those imports; `register_first=False` registers after them instead.
    """
    from vllm_indexer_epilog import envs
    from vllm_indexer_epilog.backends import npu as npu_backend
    from vllm_indexer_epilog.integrations import plugin
    from vllm_indexer_epilog.integrations import patching as site

    monkeypatch.syspath_prepend(str(FAKE_DIR))
    monkeypatch.delenv(envs.NPU_BACKEND, raising=False)
    define_indexer_compress_epilog_v2(V2_CALLS, strict_args=True)  # once per process
    site._logged.clear()
    npu_backend._logged.clear()

    def _boot(device: str = "A5", register_first: bool = True) -> Standin:
        plugin.unregister()
        _forget_fakes()
        utils = importlib.import_module("vllm_ascend.utils")
        utils.DEVICE = utils.AscendDeviceType[device]
        V2_CALLS.clear()
        if register_first:
            plugin.register()
        standin = Standin(
            torch_npu=importlib.import_module("torch_npu"),
            utils=utils,
            device_op=importlib.import_module("vllm_ascend.device.device_op"),
            indexer=importlib.import_module("vllm_ascend.models.deepseek_v4.indexer"),
            sfa=importlib.import_module("vllm_ascend.attention.sfa_v1"),
            v2_calls=V2_CALLS,
        )
        if not register_first:
            plugin.register()
        return standin

    yield _boot
    plugin.unregister()
    _forget_fakes()


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class PackedCache:
    raw: torch.Tensor  # uint8, all pages
    values: torch.Tensor  # [nb, bs, 1, d]
    scales: torch.Tensor  # [nb, bs, 1, G]
    full: torch.Tensor  # [nb, bs, 1, d + G * scale bytes]
    page: int


def carve_packed(spec: Any, num_blocks: int, *, pad: int = 0, seed: int = 0) -> PackedCache:
    """Pages of `spec.page_size_bytes + pad` random bytes, viewed as the model runner views them on A5."""
    bs, d, g = spec.block_size, spec.head_size, spec.scale_dim
    page = spec.page_size_bytes + pad
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (num_blocks * page,), generator=gen, dtype=torch.uint8)
    vsize, ssize = _dtype_size(spec.dtype), _dtype_size(spec.scale_dtype)
    values = torch.as_strided(raw.view(spec.dtype), (num_blocks, bs, 1, d), (page // vsize, d, d, 1), 0)
    scales = torch.as_strided(raw.view(spec.scale_dtype), (num_blocks, bs, 1, g), (page // ssize, g, g, 1),
                              bs * d * vsize // ssize)
    row = d * vsize + g * ssize
    full = torch.as_strided(raw.view(spec.dtype), (num_blocks, bs, 1, row), (page // vsize, row, row, 1), 0)
    return PackedCache(raw, values, scales, full, page)


def expected_packed(cache: PackedCache, x: torch.Tensor, slots: torch.Tensor, quant_mode: int,
                    round_scale: bool) -> torch.Tensor:
    """The raw bytes after the op: the reference run on contiguous copies of the rows, put back into the pages."""
    from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

    nb, bs, _, d = cache.values.shape
    g = cache.scales.shape[-1]
    want = cache.raw.clone()
    rows_v = cache.values.reshape(nb * bs, d).clone()
    rows_s = cache.scales.reshape(nb * bs, g).clone()
    reference_indexer_compress_epilog(rows_v, rows_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    page_v = rows_v.view(torch.uint8).view(nb, bs * d)
    page_s = rows_s.contiguous().view(torch.uint8).view(nb, -1)
    pages = want.view(nb, cache.page)
    pages[:, : bs * d] = page_v
    pages[:, bs * d : bs * d + page_s.shape[1]] = page_s
    return want
