"""DeepSeek-V3.2's LI-C8 indexer-key hook against the REAL `attention/sfa_v1.py` of one release (child
process; npu_standin.py boots it): what installing did there (hooked / no site / refused by version, one
log line each), and gap 1 -- prefill context parallel refused at start-up -- on the real class hierarchy.

Not run for real here: `AscendSFAImpl.__init__` and `forward` (they need a built DeepSeek-V3.2 model, its
Ascend config and process groups); the LI-C8 write itself stays proven on the reduced site of
tests/fakes/npu (tests/integrations/test_ascend_sfa_li_c8.py), whose call pattern
test_vllm_ascend_sites.py checks against the real source.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import npu_standin
from vllm_indexer_epilog.integrations.config import EpilogConfig
from vllm_indexer_epilog.integrations.patching import version_allowed
from vllm_indexer_epilog.integrations.vllm_ascend import sfa_li_c8 as hook

SFA = importlib.import_module("vllm_ascend.attention.sfa_v1")  # vllm-ascend's first import: the hook installs
try:  # the LI-C8 write's own backend from 0.28.0rc1 (a small helper module before, absent in 0.23.0)
    IDX = importlib.import_module("vllm_ascend.attention.indexer")
except ImportError:
    IDX = None
RELEASE = npu_standin.release()
INLINE = {(0, 23, 0), (0, 24, 0), (0, 25, 1), (0, 26, 0), (0, 27, 1)}  # LI-C8 written inline in sfa_v1
BACKEND = RELEASE >= (0, 28)  # LI-C8 written by AscendSFAIndexerBackend.write_cache


def test_what_installing_did_is_one_line(log_lines) -> None:
    lines = [line for line in log_lines() if line.startswith("sfa_li_c8:") and " will hook when " not in line]
    assert len(lines) == 1, lines
    (line,) = lines
    pre_process = getattr(SFA.AscendSFAImpl, "indexer_select_pre_process", None)  # gone from 0.28.0rc1
    inline_hooked = getattr(pre_process, "__module__", None) == hook.__name__
    write = getattr(getattr(IDX, "AscendSFAIndexerBackend", None), "write_cache", None)
    backend_hooked = getattr(write, "__module__", None) == hook.__name__
    if RELEASE[:3] in INLINE:
        assert inline_hooked and not backend_hooked and line.startswith("sfa_li_c8: hooked AscendSFAImpl")
        assert isinstance(SFA.torch_npu, hook.TorchNpuProxy)
    elif BACKEND:
        assert backend_hooked and not inline_hooked and line.startswith("sfa_li_c8: hooked AscendSFAIndexerBackend")
        assert isinstance(IDX.torch_npu, hook.TorchNpuProxy) and not isinstance(SFA.torch_npu, hook.TorchNpuProxy)
    else:
        assert not inline_hooked and "not hooked" in line and not version_allowed(".".join(map(str, RELEASE)), hook.VERSIONS)


def _bare(cls, **attrs):
    """An instance of the release's own class without running its __init__ (which needs a built model)."""
    layer = object.__new__(cls)
    layer.__dict__.update(c8_k_cache_dtype=torch.float8_e4m3fn, enable_dsa_cp=False, **attrs)
    return layer


@pytest.mark.skipif(RELEASE != (0, 23, 0), reason="the LI-C8 hook is engaged on 0.23.0 only")
def test_prefill_context_parallel_is_refused_at_start_up() -> None:
    """Gap 1: 0.23.0 gathers keys in AscendSFACPImpl._get_full_kv (no _prepare_kv_for_parallel, and
    enable_dsa_cp is False under PCP): the hook must refuse that layer in __init__, not fail mid-serving."""
    cp = importlib.import_module("vllm_ascend.attention.context_parallel.sfa_cp")
    assert not hasattr(SFA.AscendSFAImpl, "_prepare_kv_for_parallel")
    assert cp.AscendSFACPImpl._get_full_kv is not SFA.AscendSFAImpl._get_full_kv
    base = {name: getattr(SFA.AscendSFAImpl, name, None) for name in hook.GATHER_METHODS}
    config = EpilogConfig()
    plain = _bare(SFA.AscendSFAImpl, c8_enable_reshape_optim=False)
    sfa = type("Sfa", (), {"get_ascend_config": staticmethod(lambda: plain)})
    assert hook._why_not(plain, config, sfa, base) is None
    why = hook._why_not(_bare(cp.AscendSFACPImpl, pcp_size=2, c8_enable_reshape_optim=False), config, sfa, base)
    assert why is not None and "AscendSFACPImpl gathers keys" in why
    # A PCP group of two ranks is refused even on the base class.
    assert hook._why_not(_bare(SFA.AscendSFAImpl, pcp_size=2), config, sfa, base) is not None


@pytest.mark.skipif(RELEASE[:3] not in INLINE, reason="LI-C8 written inline in sfa_v1 on 0.23.0 .. 0.27.1rc1 only")
def test_the_write_goes_through_the_registered_op() -> None:
    """Gap 4, LI-C8: the proxy the hook put in the real sfa_v1 turns the three inline calls into one call of
    torch.ops.custom.indexer_compress_epilog (what graph capture sees). The three calls are made here in
    the order sfa_v1 makes them (forward cannot run on CPU; test_vllm_ascend_sites.py checks that order)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

    class Ops(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    assert isinstance(SFA.torch_npu, hook.TorchNpuProxy)
    n, d = 48, 128
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randint(0, 256, (n // 16, 16, 1, d), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    s_cache = torch.rand(n // 16, 16, 1, 1, generator=g)
    x = torch.randn(20, d, generator=g).to(torch.bfloat16)
    slots = torch.randperm(n, generator=g)[:20]
    slots[::3] = -1
    want_k, want_s = k_cache.clone().view(n, d), s_cache.clone().view(n, 1)
    reference_indexer_compress_epilog(want_k, want_s, x, slots)
    hook.calls.capturing, hook.calls.quantized = EpilogConfig(), False
    try:
        k_li, k_li_scale = SFA.torch_npu.npu_dynamic_quant(x, dst_type=torch.float8_e4m3fn)
    finally:
        hook.calls.capturing = None
    idx = slots.view(-1, 1)
    with Ops() as ops:
        SFA.torch_npu.npu_scatter_nd_update_(k_cache.view(n, d), idx, k_li.view(-1, k_li.shape[-1]))
        SFA.torch_npu.npu_scatter_nd_update_(s_cache.view(n, 1), idx, k_li_scale.view(-1, 1))
    assert "custom.indexer_compress_epilog" in ops.names
    assert not any(c[0] == "npu_scatter_nd_update_" for c in npu_standin.CALLS)
    assert torch.equal(k_cache.view(n, d).view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(s_cache.view(n, 1), want_s)


def _bare_backend(**attrs):
    layer = object.__new__(IDX.AscendSFAIndexerBackend)
    torch.nn.Module.__init__(layer)
    for k, v in {**dict(c8_k_cache_dtype=torch.float8_e4m3fn, enable_sparse_li_c8=True, enable_sparse_li_c4=False,
                        _pcp_active=False, _dsa_cp_active=False), **attrs}.items():
        object.__setattr__(layer, k, v)
    return layer


@pytest.mark.skipif(not BACKEND, reason="AscendSFAIndexerBackend writes LI-C8 from 0.28.0rc1")
def test_backend_refuses_what_it_cannot_serve_at_start_up(monkeypatch) -> None:
    """Reshape optimisation (store_kv_block), PCP / DSA-CP gathers and an INT8 cache: refused, named."""
    config = EpilogConfig()
    monkeypatch.setattr(IDX.AscendSFAIndexerBackend, "_use_c8_reshape_optim", lambda self: False)
    assert hook._backend_why_not(_bare_backend(), config) is None
    assert "int8" in hook._backend_why_not(_bare_backend(c8_k_cache_dtype=torch.int8), config)
    assert "context parallel" in hook._backend_why_not(_bare_backend(_pcp_active=True), config)
    assert "DSA-CP" in hook._backend_why_not(_bare_backend(_dsa_cp_active=True), config)
    assert "e8m0" in hook._backend_why_not(_bare_backend(), EpilogConfig(quant_mode=0))
    monkeypatch.setattr(IDX.AscendSFAIndexerBackend, "_use_c8_reshape_optim", lambda self: True)
    assert "store_kv_block" in hook._backend_why_not(_bare_backend(), config)


@pytest.mark.skipif(not BACKEND, reason="AscendSFAIndexerBackend writes LI-C8 from 0.28.0rc1")
def test_backend_write_cache_is_one_registered_op_call() -> None:
    """The release's own (hooked) write_cache, given what the hooked forward_k hands back: one call of
    custom.indexer_compress_epilog writing both cache slots, the bytes of the reference, no scatter_cache."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

    class Ops(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    n, d = 48, 128
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randint(0, 256, (n // 16, 16, 1, d), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    s_cache = torch.rand(n // 16, 16, 1, 1, generator=g)
    layer = _bare_backend()
    object.__setattr__(layer, "k_cache", type("KC", (), {"kv_cache": [k_cache, s_cache]})())
    object.__setattr__(layer, hook.ATTR, EpilogConfig())
    x = torch.randn(20, 1, d, generator=g).to(torch.bfloat16)
    slots = torch.randperm(n, generator=g)[:20]
    slots[::4] = -1
    want_k, want_s = k_cache.clone().view(n, d), s_cache.clone().view(n, 1)
    reference_indexer_compress_epilog(want_k, want_s, x.view(-1, d), slots)
    hook.calls.capturing, hook.calls.quantized = EpilogConfig(), False
    try:  # what forward_k does on every release of this generation
        k_li, k_li_scale = IDX.torch_npu.npu_dynamic_quant(x.view(-1, d), dst_type=torch.float8_e4m3fn)
    finally:
        hook.calls.capturing = None
    k_li_scale = k_li_scale.to(torch.float32).unsqueeze(-1)
    with Ops() as ops:
        IDX.AscendSFAIndexerBackend.write_cache(layer, k_li, k_li_scale, slots, indexer_attn_metadata=None)
    assert ops.names.count("custom.indexer_compress_epilog") == 1
    assert not any(c[0] == "npu_dynamic_quant" for c in npu_standin.CALLS[-1:])
    assert torch.equal(k_cache.view(n, d).view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(s_cache.view(n, 1), want_s)
    # A write_cache given anything else (here: a second call without forward_k) fails loudly.
    with pytest.raises(hook.SiteDrift):
        IDX.AscendSFAIndexerBackend.write_cache(layer, k_li, k_li_scale, slots, indexer_attn_metadata=None)
