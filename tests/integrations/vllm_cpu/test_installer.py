"""The vllm-cpu compat layer's installer: the version guard (other versions: one line, nothing installed),
ops vLLM's library has are kept, an op whose Python caller drifted from its schema is skipped, the plugin
survives an exception of ours, and a full install (in a subprocess: it defines ops on torch.ops._C) is
undone by unregister()."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import types

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vllm_indexer_epilog.integrations import patching, plugin  # noqa: E402
from vllm_indexer_epilog.integrations import vllm_cpu_compat as vllm_cpu  # noqa: E402
from vllm_indexer_epilog.integrations.patching import Patcher  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat.compat_ops import CompatOp  # noqa: E402


def _never(*args, **kwargs):
    raise AssertionError("must not be registered")


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", None])
def test_version_guard_refuses_other_versions_with_one_line(version, monkeypatch) -> None:
    monkeypatch.setattr(vllm_cpu, "vllm_cpu_version", lambda: version)
    patcher = Patcher()
    lines = vllm_cpu.install(patcher)
    assert len(lines) == 1 and "written against vllm-cpu 0.32.0" in lines[0] and "nothing installed" in lines[0]
    assert patcher._undo == []


def test_supported_versions() -> None:
    assert vllm_cpu.version_supported("0.32.0") and vllm_cpu.version_supported("0.32.3")
    assert vllm_cpu.version_supported("0.32.1rc1")
    assert not vllm_cpu.version_supported("0.31.9")


def test_op_present_in_vllms_library_is_not_redefined() -> None:
    import vllm._custom_ops  # noqa: F401

    assert hasattr(torch.ops._C, "rms_norm")  # in every vllm-cpu library (_C_AVX2 included)
    op = CompatOp(name="rms_norm", schema="(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()",
                  impl=_never, fake=_never)
    before = list(vllm_cpu._libraries)
    patcher, lines = Patcher(), []
    assert vllm_cpu.install_ops(patcher, [op], lines) == []
    assert vllm_cpu._libraries == before and patcher._undo == []
    assert lines == ["vllm_cpu: vLLM's library has rms_norm; kept"]


def test_op_whose_caller_drifted_is_skipped_with_one_line(monkeypatch) -> None:
    caller = types.ModuleType("vie_fake_custom_ops")

    def drifted(x, m):  # the schema says (x, n)
        return torch.ops._C.vie_test_drifted_op(x, m)

    caller.drifted = drifted
    monkeypatch.setitem(sys.modules, "vie_fake_custom_ops", caller)
    op = CompatOp(name="vie_test_drifted_op", schema="(Tensor x, int n) -> Tensor", impl=_never, fake=_never,
                  caller=("vie_fake_custom_ops", "drifted"))
    patcher, lines = Patcher(), []
    assert vllm_cpu.install_ops(patcher, [op], lines) == []
    assert len(lines) == 1 and "_C::vie_test_drifted_op not defined" in lines[0] and "(x, m)" in lines[0]
    assert not hasattr(torch.ops._C, "vie_test_drifted_op") and patcher._undo == []


def test_caller_matching_the_schema_passes(monkeypatch) -> None:
    mod = types.ModuleType("vie_fake_match")
    mod.f = lambda a, b: None
    monkeypatch.setitem(sys.modules, "vie_fake_match", mod)
    op = CompatOp(name="x", schema="(Tensor a, int b) -> ()", impl=_never, fake=_never, caller=("vie_fake_match", "f"))
    assert vllm_cpu.caller_drift(op) is None


def test_plugin_survives_an_exception_of_ours(monkeypatch, caplog) -> None:
    import vllm.platforms  # noqa: F401  (as inside vLLM)

    rolled_back = []

    def boom(patcher):
        patcher.on_undo(lambda: rolled_back.append(1))  # something half-done: must be rolled back
        raise RuntimeError("boom")

    plugin.unregister()
    patching._logged.clear()
    monkeypatch.setattr(vllm_cpu, "install", boom)
    monkeypatch.setattr(plugin, "vllm_ascend_version", lambda: None)
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    try:
        plugin.register()
        plugin.register()  # idempotent
        warnings = [r for r in caplog.records
                    if r.levelno == logging.WARNING and "vllm-cpu compat layer" in r.getMessage()]
        assert len(warnings) == 1 and "RuntimeError: boom" in warnings[0].getMessage()
        assert rolled_back == [1]
    finally:
        plugin.unregister()
        patching._logged.clear()


_FULL_INSTALL = textwrap.dedent("""
    import logging, sys, torch
    import vllm.platforms  # as inside vLLM: the platform is known before plugins load
    import vllm._custom_ops  # noqa: F401  (vLLM's own library for this CPU: _C, _C_AVX512 or _C_AVX2)
    from vllm_indexer_epilog.integrations import plugin
    from vllm_indexer_epilog.integrations.vllm_cpu_compat import OP_NAMES

    def has_kernel(name):
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"_C::{name}", "CPU")
        except RuntimeError:  # "operator _C::<name> does not exist"
            return False

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage().removeprefix("vllm_indexer_epilog: "))
    logging.getLogger("vllm_indexer_epilog").addHandler(handler)
    logging.getLogger("vllm_indexer_epilog").setLevel(logging.INFO)

    # Which ops vLLM's library lacks on this host: all 16 without AVX512-BF16 (_C_AVX2/_C_AVX512), none with it.
    missing = [n for n in OP_NAMES if not has_kernel(n)]
    assert missing == ([] if torch.cpu._is_avx512_bf16_supported() else list(OP_NAMES)), missing
    plugin.register()
    assert all(has_kernel(n) for n in OP_NAMES), [n for n in OP_NAMES if not has_kernel(n)]
    # The layer defined exactly the missing ops and kept vLLM's (one line each, only when non-empty).
    defined = [m for m in messages if m.startswith("vllm_cpu: defined ")]
    kept = [m for m in messages if m.startswith("vllm_cpu: vLLM's library has ")]
    if missing:
        assert defined == [f"vllm_cpu: defined {len(missing)} op(s) on torch.ops._C: {', '.join(missing)}"], messages
    else:
        assert defined == [], messages
    present = [n for n in OP_NAMES if n not in missing]
    if present:
        assert kept == [f"vllm_cpu: vLLM's library has {', '.join(present)}; kept"], messages
    else:
        assert kept == [], messages
    # The metadata kernels and the tile-scheduler fix are installed on every host (vLLM's C++ ops do not
    # replace them: stock Triton has no CPU backend, and the CPU builder lacks 'c1a' everywhere).
    from vllm.v1.attention.backends.mla import sparse_swa  # imported after install: patched on import
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm_indexer_epilog.integrations.vllm_cpu_compat import metadata
    assert sparse_swa.ComputeSWAIndicesAndLensKernel.__call__ is metadata.swa_indices_and_lens
    assert "c1a" in cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler(None, 1)
    plugin.unregister()
    # Ours are gone, vLLM's stay.
    assert [n for n in OP_NAMES if not has_kernel(n)] == missing
    assert "build_tile_scheduler" not in vars(cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder) or \\
        cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler.__module__ == cpu_mla.__name__
    assert sparse_swa.ComputeSWAIndicesAndLensKernel.__call__ is not metadata.swa_indices_and_lens
    plugin.register()  # a second cycle defines them again
    assert all(has_kernel(n) for n in OP_NAMES)
    assert sparse_swa.ComputeSWAIndicesAndLensKernel.__call__ is metadata.swa_indices_and_lens
    print("FULL_INSTALL_OK", len(missing))
""")


def test_full_install_and_undo_in_a_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-c", _FULL_INSTALL], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FULL_INSTALL_OK" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]
