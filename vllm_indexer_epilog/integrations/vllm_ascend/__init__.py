"""The vllm-ascend sites the plugin hooks, one module per site (see each module's docstring)."""

from __future__ import annotations

from . import deepseek_v4_indexer, sfa_li_c8
from ..patching import Hook, Patcher, install_hook

HOOKS: tuple[Hook, ...] = (deepseek_v4_indexer, sfa_li_c8)  # type: ignore[assignment]

__all__ = ["HOOKS", "Patcher", "install_hook"]
