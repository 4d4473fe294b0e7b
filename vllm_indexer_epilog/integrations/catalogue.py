"""Every upstream site this package patches, in one place: what, why, how, against which versions, and
when the patch can be deleted (in the spirit of vllm-ascend's `patch/__init__.py`).

Each integration module that patches something declares its sites as `PATCHES`; this module only
gathers them, so an entry lives beside the code it describes and cannot drift from it. `python -m
vllm_indexer_epilog.integrations.catalogue` prints the table (docs/patches.md is that output, written by scripts/gen_docs.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class PatchSite:
    target: str  # the upstream object patched, e.g. "vllm_ascend.device.device_op.DeviceOperator.indexer_quant_scatter"
    why: str  # what it would do without the patch, and what the patch changes
    how: str  # the mechanism: attribute replaced, op defined on a namespace, proxy, ...
    versions: str  # the upstream releases it was written against and is guarded for
    remove_when: str  # the upstream change that makes it unnecessary


# Modules that declare PATCHES; imported lazily, none imports vLLM or vllm-ascend at module level. Each passes
# its entries to `Patcher.set` (patching.py), the only way an upstream attribute is replaced.
DECLARING_MODULES = (
    "vllm_indexer_epilog.integrations.vllm_ascend.deepseek_v4_indexer",
    "vllm_indexer_epilog.integrations.vllm_ascend.sfa_li_c8",
    "vllm_indexer_epilog.integrations.vllm_cpu_compat",
    "vllm_indexer_epilog.integrations.model_build",
    "vllm_indexer_epilog.integrations.dsv4_indexer_cpu.indexer_cache",
)


def all_patches() -> list[PatchSite]:
    sites: list[PatchSite] = []
    for name in DECLARING_MODULES:
        sites.extend(getattr(importlib.import_module(name), "PATCHES", ()))
    return sites


def as_markdown() -> str:
    rows = ["| target | why | how | versions | remove when |", "|---|---|---|---|---|"]
    rows += [f"| `{p.target}` | {p.why} | {p.how} | {p.versions} | {p.remove_when} |" for p in all_patches()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(as_markdown())
