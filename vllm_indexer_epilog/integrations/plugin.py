"""vLLM general-plugin entry point: `vllm.general_plugins: indexer_epilog = vllm_indexer_epilog.integrations.plugin:register`.

vLLM calls `register()` in every process (API server, engine core, each worker) before it builds a
model. It registers the op and arms the vllm-ascend hooks, which install when vllm-ascend first imports
their site modules (integrations/patching.py). It is idempotent and never breaks start-up: a site that is absent,
of a vllm-ascend version it was not written against, or whose hook fails to install gets one log line
and keeps vllm-ascend's own path. The only errors it lets through come later, from a hook reading the
`indexer_epilog` flag at model build time: a bad value, or one the platform cannot serve.
"""

from __future__ import annotations

import logging

from .patching import Patcher, log_once, vllm_ascend_version

logger = logging.getLogger("vllm_indexer_epilog")
_patcher: Patcher | None = None


def _share_vllm_log_handlers() -> None:
    """Our lines go where vLLM's go (its `vllm` logger does not propagate to the root logger)."""
    vllm_logger = logging.getLogger("vllm")
    if not logger.handlers and vllm_logger.handlers:
        logger.handlers = list(vllm_logger.handlers)
        logger.setLevel(vllm_logger.level or logging.INFO)
        logger.propagate = False


def register() -> None:
    global _patcher
    if _patcher is not None:
        return
    _patcher = Patcher()
    _share_vllm_log_handlers()
    try:
        # Importing this module imported the package, which registered the op.
        from .vllm_ascend import HOOKS, install_hook

        if vllm_ascend_version() is None:
            log_once("custom.indexer_compress_epilog registered; vllm-ascend not installed, so no indexer "
                     "write site is hooked on this platform and vLLM's own paths are untouched")
            return
        for hook in HOOKS:
            level, line = install_hook(hook, _patcher)
            log_once(line, level)
    except Exception as exc:  # start-up must survive anything of ours
        _patcher.undo()
        logger.warning("vllm_indexer_epilog: plugin disabled (%s: %s); vLLM's own paths are untouched",
                       type(exc).__name__, exc)


def unregister() -> None:
    """Undo every hook (tests; a process that wants vLLM's own paths back)."""
    global _patcher
    if _patcher is not None:
        _patcher.undo()
        _patcher = None
