"""Logging a line once per process: the plugin's start-up runs in every vLLM process, its hooks per layer and
the NPU writer per call, and one line of each is enough. One set for the whole package (tests clear it)."""

from __future__ import annotations

import logging

PREFIX = "vllm_indexer_epilog: "
_logged: set[str] = set()


def log_once(message: str, level: int = logging.INFO, *, prefix: str = PREFIX,
             logger: logging.Logger = logging.getLogger("vllm_indexer_epilog")) -> None:
    """Log `prefix + message` the first time this process sees `message`. `prefix=""` for lines that name the
    plugin themselves ("indexer_epilog: ...")."""
    if message not in _logged:
        _logged.add(message)
        logger.log(level, "%s%s", prefix, message)
