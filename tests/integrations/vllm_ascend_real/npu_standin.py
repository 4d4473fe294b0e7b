"""pytest plugin (`-p npu_standin`) for the real-code runs: a stand-in NPU layer under the REAL vllm-ascend.

Loaded in a child process whose PYTHONPATH starts with one release's folder (releases.py). Before anything
of vLLM or vllm-ascend is imported it installs what no CPU machine has, modelled on the CPU branch of
vllm-ascend's own tests/ut/conftest.py: a `torch_npu` module (MagicMocks for what is only touched at import,
plus working `npu_dynamic_quant` / `npu_scatter_nd_update_` that record their calls), `torch.npu`, `acl`,
`triton.runtime`, `vllm_ascend._build_info` saying A5 (VIE_DEVICE overrides), and recorders for the two
compiled `_C_ascend` ops the sites reach, with the schemas of vllm-ascend's library. Then, as vLLM does, it
loads the general plugins (only ours: VLLM_PLUGINS=indexer_epilog) and imports `vllm_ascend.ops` (the
import order vllm-ascend itself needs: `device_op` alone is circular). Nothing else is stubbed: every
vllm-ascend and vLLM module the tests touch is the release's own code.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types
from unittest.mock import MagicMock

import pytest

CALLS: list[tuple[str, dict]] = []
V2_CALLS: list[dict] = []


def _module(name: str, **attrs: object) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.util.spec_from_loader(name, loader=None)
    m.__path__ = []  # type: ignore[attr-defined]
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m
    return m


def _npu_dynamic_quant(x, dst_type=None, **_):  # noqa: ANN001, ANN202
    import torch

    dst_type = torch.int8 if dst_type is None else dst_type
    CALLS.append(("npu_dynamic_quant", {"shape": tuple(x.shape), "dst_type": dst_type}))
    top = 127.0 if dst_type == torch.int8 else torch.finfo(dst_type).max
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / top
    q = x.float() / scale.unsqueeze(-1)
    codes = q.round().clamp(-128, 127).to(torch.int8) if dst_type == torch.int8 else q.to(dst_type)
    return codes, scale


def _npu_scatter_nd_update_(cache, indices, updates):  # noqa: ANN001, ANN202
    CALLS.append(("npu_scatter_nd_update_", {"cache": tuple(cache.shape), "updates_dtype": updates.dtype}))
    rows = indices.reshape(-1).long()
    keep = rows >= 0
    flat = cache.view(-1, cache.shape[-1])
    flat[rows[keep]] = updates.reshape(rows.numel(), cache.shape[-1])[keep].to(cache.dtype)
    return cache


def _install_torch_npu() -> None:
    tn = _module("torch_npu")
    tn.npu = MagicMock()
    tn._C = MagicMock()
    tn._C._NPUTaskGroupHandle = MagicMock
    tn.npu_fusion_attention = MagicMock()
    tn.npu_format_cast = lambda w, fmt, **k: w
    tn.float4_e2m1fn_x2, tn.hifloat8, tn.float8_e8m0fnu = 296, 290, 293
    tn.npu_dynamic_quant = _npu_dynamic_quant
    tn.npu_scatter_nd_update_ = _npu_scatter_nd_update_
    sys.modules["torch_npu._C"] = tn._C
    sys.modules["torch_npu._C._distributed_c10d"] = tn._C._distributed_c10d
    _module("torch_npu.op_plugin")
    _module("torch_npu.op_plugin.atb")
    _module("torch_npu.op_plugin.atb._atb_ops", _register_atb_extensions=MagicMock())
    profiler = _module("torch_npu.profiler", dynamic_profile=MagicMock())
    for name in ("_ExperimentalConfig", "profile", "tensorboard_trace_handler", "ExportType", "ProfilerLevel",
                 "AiCMetrics", "ProfilerActivity"):
        setattr(profiler, name, MagicMock())
    tn.profiler = profiler
    acl = _module("acl")
    acl.rt = _module("acl.rt", memcpy=MagicMock())
    runtime = MagicMock()
    runtime.driver.active.utils.get_device_properties.return_value = {"num_aic": 8, "num_vectorcore": 8}
    sys.modules["triton.runtime"] = runtime

    import torch

    try:
        torch.utils.rename_privateuse1_backend("npu")
    except RuntimeError:
        pass
    torch.npu = MagicMock()
    torch.npu.current_device = MagicMock(return_value="cpu")
    torch.npu.device_count = MagicMock(return_value=0)
    sys.modules["torch.npu"] = torch.npu
    torch.version.cann = None
    _module("vllm_ascend._build_info", __device_type__=os.environ.get("VIE_DEVICE", "A5"))


def _install_c_ascend() -> None:
    """`_C_ascend.indexer_compress_epilog_v2`: records its calls; writes what the Ascend C op writes (codes
    then float32 scales in each block, from the project's reference, standard mode) when the buffer holds
    whole rows of d + 4 * G bytes, and nothing otherwise (a 1-row warmup buffer of d bytes)."""
    import torch

    from vllm_indexer_epilog.op.reference import quantize_rows
    from vllm_indexer_epilog.op.spec import FP8_FORMATS, QUANT_MODE_STANDARD, num_groups

    lib = torch.library.Library("_C_ascend", "FRAGMENT")
    lib.define("indexer_compress_epilog_v2(Tensor(a!) indexer_compress_cache, Tensor x, Tensor slot_mapping, "
               "int layout=2) -> ()")

    def v2(cache, x, slot_mapping, layout=2):  # noqa: ANN001, ANN202
        assert cache.dtype == torch.uint8 and cache.dim() == 4 and layout == 2
        d = x.shape[-1]
        g = num_groups(d)
        V2_CALLS.append({"shape": tuple(cache.shape), "block_stride": cache.stride(0), "x": x,
                         "slots": slot_mapping.clone(), "storage": cache.untyped_storage().data_ptr(),
                         "offset": cache.storage_offset()})
        if cache.shape[-1] < d + 4 * g:
            return
        bs = cache.shape[1]
        flat = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())
        codes, scales = quantize_rows(x.reshape(-1, d), FP8_FORMATS[torch.float8_e4m3fn], QUANT_MODE_STANDARD, True)
        for r, s in enumerate(slot_mapping.reshape(-1).tolist()):
            if s < 0:
                continue
            base = cache.storage_offset() + (s // bs) * cache.stride(0)
            off = s % bs
            flat[base + off * d: base + (off + 1) * d] = codes[r].view(torch.uint8)
            at = base + bs * d + off * g * 4
            flat[at: at + g * 4] = scales[r].contiguous().view(torch.uint8)

    lib.impl("indexer_compress_epilog_v2", v2, "CPU")
    _install_c_ascend.lib = lib  # type: ignore[attr-defined]  (keep the library alive)


def pytest_configure(config: pytest.Config) -> None:
    _install_torch_npu()
    _install_c_ascend()
    logging.getLogger("vllm_indexer_epilog").setLevel(logging.INFO)
    os.environ.setdefault("VLLM_PLUGINS", "indexer_epilog")
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    importlib.import_module("vllm_ascend.ops")


def release() -> tuple[int, ...]:
    from vllm_indexer_epilog.integrations.patching import release as parse, vllm_ascend_version

    return parse(vllm_ascend_version() or "0")


@pytest.fixture
def log_lines(caplog: pytest.LogCaptureFixture):
    """The plugin's log lines so far in this process (log_once lines are logged only once: keep them)."""
    from vllm_indexer_epilog.integrations import patching

    return lambda: sorted(patching._logged)
