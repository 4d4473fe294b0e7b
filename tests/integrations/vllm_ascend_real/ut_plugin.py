"""pytest plugin (`-p ut_plugin`) for running vllm-ascend's OWN unit tests (tests/ut of a release's source
archive) in a child process, with the plugin inactive or with every hook active (VIE_UT_HOOKS=1).

vllm-ascend's `tests/ut/conftest.py` installs its own torch_npu stand-ins and runs `adapt_patch()`, which
imports vLLM model modules reaching `transformers`' Qwen2-VL image processor, which imports torchvision at
module level; torchvision is not in this project's environment (and nothing under test uses it), so a bare
module stands in for it. Nothing else is added: the tests, their mocks and vllm-ascend are the release's own.
With VIE_UT_HOOKS=1 the general plugins are loaded as vLLM loads them (VLLM_PLUGINS=indexer_epilog), after
the release's conftest, so every hook installs when vllm-ascend imports its site, in standard mode.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from unittest.mock import MagicMock


def _stub(name: str) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.util.spec_from_loader(name, loader=None)
    m.__path__ = []  # type: ignore[attr-defined]
    m.__getattr__ = lambda attr: MagicMock(name=f"{name}.{attr}")  # type: ignore[method-assign]
    sys.modules[name] = m
    return m


if importlib.util.find_spec("torchvision") is None:
    for _name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                  "torchvision.transforms.v2.functional", "torchvision.transforms.functional", "torchvision.io"):
        _stub(_name)


def pytest_configure(config) -> None:  # noqa: ANN001
    if os.environ.get("VIE_UT_HOOKS") != "1":
        return
    os.environ["VLLM_PLUGINS"] = "indexer_epilog"
    import logging

    logging.getLogger("vllm_indexer_epilog").setLevel(logging.INFO)
    from vllm.plugins import load_general_plugins

    load_general_plugins()


def pytest_report_header(config) -> list[str]:  # noqa: ANN001
    if os.environ.get("VIE_UT_HOOKS") != "1":
        return ["vllm_indexer_epilog: plugin inactive (VLLM_PLUGINS empty)"]
    from vllm_indexer_epilog.integrations import patching

    return ["vllm_indexer_epilog: plugin loaded, hooks armed"] + sorted(patching._logged)


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    """What the hooks did during the run (activated layers, refusals): the plugin's log lines."""
    if os.environ.get("VIE_UT_HOOKS") != "1":
        return
    from vllm_indexer_epilog.integrations import patching

    terminalreporter.write_line("vllm_indexer_epilog log lines: " + " | ".join(sorted(patching._logged)))
