"""pytest plugin (`-p npu_standin`) for the real-code runs: a stand-in NPU layer under the REAL vllm-ascend.

Loaded in a child process whose PYTHONPATH starts with one release's folder (releases.py). Before anything
of vLLM or vllm-ascend is imported it installs what no CPU machine has, modelled on the CPU branch of
vllm-ascend's own tests/ut/conftest.py: a `torch_npu` module (MagicMocks for what is only touched at import,
plus working `npu_dynamic_quant` / `npu_scatter_nd_update_` that record their calls), `torch.npu`, `acl`,
`triton.runtime`, `vllm_ascend._build_info` saying A5 (VIE_DEVICE overrides), and recorders for the two
compiled `_C_ascend` ops the sites reach, with the schemas of vllm-ascend's library (the ops themselves are
tests/fakes/npu_ops.py, shared with the reduced stand-in). Then, as vLLM does, it
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

# The NPU ops themselves are the shared stand-ins (tests/fakes/npu_ops.py; the parent puts tests/ on PYTHONPATH).
# That module imports only torch: this package is imported later, once the torch_npu stand-in exists.
from fakes.npu_ops import RecordingNpuOps, define_indexer_compress_epilog_v2

CALLS: list[tuple[str, dict]] = []  # torch_npu's recorded calls
V2_CALLS: list[dict] = []  # _C_ascend.indexer_compress_epilog_v2's


def _module(name: str, **attrs: object) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.util.spec_from_loader(name, loader=None)
    m.__path__ = []  # type: ignore[attr-defined]
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m
    return m


def _install_torch_npu() -> None:
    tn = _module("torch_npu")
    tn.npu = MagicMock()
    tn._C = MagicMock()
    tn._C._NPUTaskGroupHandle = MagicMock
    tn.npu_fusion_attention = MagicMock()
    tn.npu_format_cast = lambda w, fmt, **k: w
    tn.float4_e2m1fn_x2, tn.hifloat8, tn.float8_e8m0fnu = 296, 290, 293
    ops = RecordingNpuOps(CALLS)
    tn.npu_dynamic_quant = ops.npu_dynamic_quant
    tn.npu_scatter_nd_update_ = ops.npu_scatter_nd_update_
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


def pytest_configure(config: pytest.Config) -> None:
    _install_torch_npu()
    # The real releases' own warmup call reaches it too, with argument types this project does not choose.
    define_indexer_compress_epilog_v2(V2_CALLS, strict_args=False)
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
