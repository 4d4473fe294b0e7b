"""CPU-op wrappers found in vllm._custom_ops (vLLM <= 0.33.0) or vllm._cpu_ops (0.34.0 on) (issue 19 item 3)."""

from __future__ import annotations

import types

import pytest

from vllm_indexer_epilog.integrations.dsv4_indexer_cpu import indexer_cache as ic
from vllm_indexer_epilog.integrations.patching import CPU_OPS_MODULES, Patcher, cpu_op_wrapper


def _module(monkeypatch, name: str, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    monkeypatch.setitem(__import__("sys").modules, name, m)
    return m


@pytest.mark.parametrize("where", CPU_OPS_MODULES)
def test_the_wrapper_is_found_in_either_module(monkeypatch, where) -> None:
    def fp8_paged_mqa_logits_cpu(q_fp8, kvcache_fp8, weight, seq_lens, page_table, block_size, max_seq_len):
        return "vllm's"

    for name in CPU_OPS_MODULES:
        _module(monkeypatch, name, **({"fp8_paged_mqa_logits_cpu": fp8_paged_mqa_logits_cpu} if name == where else {}))
    module, fn = cpu_op_wrapper("fp8_paged_mqa_logits_cpu")
    assert module.__name__ == where and fn is fp8_paged_mqa_logits_cpu
    assert cpu_op_wrapper("no_such_op") is None


@pytest.mark.parametrize("where", CPU_OPS_MODULES)
def test_the_reader_hook_patches_the_module_that_defines_it(monkeypatch, where) -> None:
    original = lambda *a: "vllm's"  # noqa: E731
    holder = _module(monkeypatch, where, fp8_paged_mqa_logits_cpu=original)
    other = _module(monkeypatch, next(n for n in CPU_OPS_MODULES if n != where))
    patcher = Patcher()
    try:
        lines = ic._patch_read(patcher, holder)
        assert ic._patch_read(patcher, other) == []
        assert holder.fp8_paged_mqa_logits_cpu is not original
        assert lines == [f"indexer_cache: hooked {where.removeprefix('vllm.')}.fp8_paged_mqa_logits_cpu"]
        assert ic.READ_SITES[where].target == f"{where}.fp8_paged_mqa_logits_cpu"
    finally:
        patcher.undo()
    assert holder.fp8_paged_mqa_logits_cpu is original
