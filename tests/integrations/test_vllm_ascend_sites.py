"""The hooks' assumptions, checked against the real vllm-ascend releases of their version range.

The stand-in layer (tests/fakes/npu) proves what the hooks do given the sites' call pattern; this proves the
call pattern is the real one. It downloads the released x86_64 wheels from PyPI and parses the Python
sources of each hooked site (nothing of vllm-ascend is imported or run: that needs an NPU).
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
import zipfile

import pytest

from vllm_indexer_epilog import envs
from vllm_indexer_epilog.integrations.vllm_ascend import HOOKS, sfa_li_c8
from vllm_indexer_epilog.integrations.vllm_ascend.deepseek_v4_indexer import CACHE_MODULES
from vllm_indexer_epilog.integrations.patching import release, version_allowed

pytestmark = pytest.mark.network
RELEASES = ("0.23.0", "0.24.0rc1")
LI_C8_RELEASES = {"0.23.0", "0.24.0rc1"}  # 0.24.0rc1 spells it use_sparse_c8_indexer (sfa_li_c8.LI_C8_FLAGS)
WHEELS = envs.cache_dir() / "vllm-ascend"


@functools.cache
def wheel(version: str) -> zipfile.ZipFile:
    WHEELS.mkdir(parents=True, exist_ok=True)
    found = sorted(WHEELS.glob(f"vllm_ascend-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
               "--platform", "manylinux_2_34_x86_64", "--python-version", "3.11", "-d", str(WHEELS),
               f"vllm-ascend=={version}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = sorted(WHEELS.glob(f"vllm_ascend-{version}-*.whl"))
        if out.returncode or not found:
            pytest.skip(f"vllm-ascend {version} wheel not downloadable here: {out.stderr.strip()[-300:]}")
    return zipfile.ZipFile(found[0])


def source(version: str, module: str) -> str | None:
    z = wheel(version)
    for path in (module.replace(".", "/") + ".py", module.replace(".", "/") + "/__init__.py"):
        if path in z.namelist():
            return z.read(path).decode()
    return None


def tree(version: str, module: str) -> ast.Module:
    text = source(version, module)
    assert text is not None, f"{module} missing from vllm-ascend {version}"
    return ast.parse(text)


def cls(module: ast.Module, name: str) -> ast.ClassDef:
    (node,) = [n for n in module.body if isinstance(n, ast.ClassDef) and n.name == name]
    return node


def method(c: ast.ClassDef, name: str) -> ast.FunctionDef:
    (node,) = [n for n in c.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return node


def params(f: ast.FunctionDef) -> list[str]:
    return [a.arg for a in f.args.args]


def calls(node: ast.AST, dotted: str) -> list[ast.Call]:
    """Calls of `a.b` (by source text of the callee), in source order."""
    found = [n for n in ast.walk(node) if isinstance(n, ast.Call) and ast.unparse(n.func) == dotted]
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


@pytest.fixture(params=RELEASES)
def version(request) -> str:
    return request.param


def test_releases_are_in_every_hooks_version_range(version) -> None:
    assert all(version_allowed(version, hook.VERSIONS) for hook in HOOKS)
    assert release(version) < (0, 25)


def test_device_operator_methods_the_deepseek_v4_hook_replaces(version) -> None:
    m = tree(version, "vllm_ascend.device.device_op")
    want = {
        "indexer_quant_scatter": ["q", "kv", "indexer_k_cache", "indexer_scale_cache", "indexer_full_cache", "slot_mapping"],
        "indexer_quant_scatter_part1": ["kv", "indexer_k_cache", "indexer_full_cache", "slot_mapping"],
        "prepare_dsa_indexer_key_scale": ["indexer_scale_cache"],
        "indexer_quantize_query": ["q"],
    }
    for adaptor in ("BaseDeviceAdaptor", "A5DeviceAdaptor"):
        c = cls(m, adaptor)
        for name, args in want.items():
            f = method(c, name)
            assert params(f) == args, (adaptor, name)
            assert any(ast.unparse(d) == "staticmethod" for d in f.decorator_list), (adaptor, name)
    a5 = cls(m, "A5DeviceAdaptor")
    # A5 writes keys and scales in one call on the whole-block view, and part 1 returns no scale (part 3 skipped).
    assert calls(method(a5, "indexer_quant_scatter_part1"), "torch.ops._C_ascend.indexer_compress_epilog_v2")
    returns = [r for r in ast.walk(method(a5, "indexer_quant_scatter_part1")) if isinstance(r, ast.Return)]
    assert ast.unparse(max(returns, key=lambda r: r.lineno).value) == "(kv, None)"
    assert any(isinstance(n, ast.AnnAssign | ast.Assign) and "DeviceOperator" in ast.unparse(n) for n in m.body)


def _cache_module(version: str) -> ast.Module:
    for name in CACHE_MODULES:
        text = source(version, name)
        if text is not None and "class AscendDeepseekV4IndexerCache" in text:
            return ast.parse(text)
    raise AssertionError(f"AscendDeepseekV4IndexerCache not in {CACHE_MODULES}")


def test_indexer_cache_spec_carries_the_dtypes_the_hook_sets(version) -> None:
    f = method(cls(_cache_module(version), "AscendDeepseekV4IndexerCache"), "get_kv_cache_spec")
    assert params(f) == ["self", "vllm_config"]
    (spec,) = calls(f, "AscendMLAAttentionSpec")
    assert {"dtype", "scale_dim", "scale_dtype", "head_size"} <= {k.arg for k in spec.keywords}
    # ... and the block manager's page and the runner's whole-block view count the scale dtype's size.
    interface = source(version, "vllm_ascend.core.kv_cache_interface")
    spec_cls = cls(ast.parse(interface), "AscendMLAAttentionSpec")  # a dataclass: dataclasses.replace works
    assert any(ast.unparse(d).startswith("dataclass") for d in spec_cls.decorator_list)
    assert re.search(r"scale_dim\s*\*\s*get_dtype_size\(\s*self\.scale_dtype\s*\)", interface)
    runner = source(version, "vllm_ascend.worker.model_runner_v1")
    assert re.search(r"scale_dim\s*\*\s*get_dtype_size\(\s*current_kv_cache_spec\.scale_dtype\s*\)", runner)


def test_callers_look_the_operator_up_at_call_time_and_read_scales_through_it(version) -> None:
    text = source(version, "vllm_ascend.attention.dsa_v1")
    assert "from vllm_ascend.device.device_op import DeviceOperator" in text
    assert "DeviceOperator.indexer_quant_scatter_part1(" in text and "DeviceOperator.indexer_quant_scatter(" in text
    assert "kv_scale is not None" in text  # part 3 only when part 1 returned a scale
    assert "key_dequant_scale=DeviceOperator.prepare_dsa_indexer_key_scale(" in text


def test_sfa_li_c8_write_is_the_pattern_the_proxy_expects(version) -> None:
    m = tree(version, "vllm_ascend.attention.sfa_v1")
    init_source = ast.unparse(method(cls(m, "AscendSFAImpl"), "__init__"))
    if version not in LI_C8_RELEASES:
        # No LI-C8 cache in this release: the hook's install finds no site and keeps vllm-ascend's path.
        assert not any(f"self.{flag} =" in init_source for flag in sfa_li_c8.LI_C8_FLAGS)
        return
    assert any(f"self.{flag} =" in init_source for flag in sfa_li_c8.LI_C8_FLAGS)
    assert any(isinstance(n, ast.Import) and [a.name for a in n.names] == ["torch_npu"] for n in m.body)
    impl = cls(m, "AscendSFAImpl")
    pre = method(impl, "indexer_select_pre_process")
    assert params(pre) == ["self", "x", "cos", "sin"]
    (quant,) = calls(pre, "torch_npu.npu_dynamic_quant")
    assert ast.unparse(quant.args[0]).startswith("k_li")
    text = ast.unparse(pre)
    assert "k_li_scale.to(self.c8_k_scale_cache_dtype)" in text and "k_li_scale.unsqueeze(-1)" in text
    scatters = [ast.unparse(c.args[2]) for c in calls(method(impl, "forward"), "torch_npu.npu_scatter_nd_update_")]
    key, scale = "k_li.view(-1, k_li.shape[-1])", "k_li_scale.view(-1, k_li_scale.shape[-1])"
    assert key in scatters and scale in scatters and scatters.index(key) + 1 == scatters.index(scale)
    init = ast.unparse(method(impl, "__init__"))
    assert "self.c8_k_cache_dtype = torch.float8_e4m3fn" in init
    assert "self.vllm_config" in ast.unparse(impl)
    # The two configurations the hook refuses, as this release spells them.
    assert "c8_enable_reshape_optim" in ast.unparse(m) and "store_kv_block" in ast.unparse(method(impl, "forward"))
    assert any(isinstance(n, ast.ImportFrom) and "get_ascend_config" in [a.name for a in n.names] for n in m.body)


def test_device_type_probe(version) -> None:
    m = tree(version, "vllm_ascend.utils")
    assert "A5" in ast.unparse(cls(m, "AscendDeviceType"))
    assert any(isinstance(n, ast.FunctionDef) and n.name == "get_ascend_device_type" for n in m.body)
