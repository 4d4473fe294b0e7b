"""The `indexer_epilog` flag at model build (integrations/model_build.py), with vLLM's real VllmConfig: the six
bad values a careless user tried on vLLM's CPU build fail before the model is built, naming field and source;
a valid flag on a model the plugin does not serve gives one warning; a served model logs the mode line once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_indexer_epilog.integrations import model_build, patching  # noqa: E402
from vllm_indexer_epilog.integrations.config import EpilogConfig, EpilogConfigError  # noqa: E402

MODEL = Path(__file__).resolve().parents[3] / "configs" / "dsv4-tiny"


@pytest.fixture(autouse=True, scope="module")
def _plugin_undone_afterwards():  # noqa: ANN202
    """`create_engine_config()` loads vLLM's general plugins, so ours installs its hooks (tile-scheduler fix
    included) in this process; undo them, so later test modules see vLLM's own classes whatever the order."""
    yield
    from vllm_indexer_epilog.integrations import plugin

    plugin.unregister()
MODEL_SRC = "model config (config.json / --hf-overrides)"
ADDITIONAL = "--additional-config"


def vllm_config(additional: dict | None = None, hf_overrides: dict | None = None):  # noqa: ANN201
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(MODEL), load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
                      max_model_len=4096, additional_config=additional or {},
                      hf_overrides=hf_overrides or {}).create_engine_config()


BAD = {
    "unknown mode": ({"indexer_epilog": {"quant_mode": "mxfp4"}}, None, ADDITIONAL, "quant_mode"),
    "wrong type": ({"indexer_epilog": {"round_scale": "yes"}}, None, ADDITIONAL, "round_scale"),
    "unknown field": ({"indexer_epilog": {"quant_mod": "mx"}}, None, ADDITIONAL, "quant_mod"),
    "not an object": ({"indexer_epilog": "mx"}, None, ADDITIONAL, "must be a JSON object"),
    "via --hf-overrides": (None, {"indexer_epilog": {"fp8_dtype": "float8_e4m3"}}, MODEL_SRC, "fp8_dtype"),
    "sources disagree": ({"indexer_epilog": {"quant_mode": "mx"}}, {"indexer_epilog": {"quant_mode": "standard"}},
                         "differs between the model config", "--additional-config"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_flag_fails_before_the_build(case: str) -> None:
    additional, overrides, source, field = BAD[case]
    built = []
    wrapped = model_build._wrap(lambda vllm_config, prefix="": built.append(1))
    with pytest.raises(EpilogConfigError) as err:
        wrapped(vllm_config=vllm_config(additional, overrides))
    assert source in str(err.value) and field in str(err.value)
    assert not built


def test_unserved_flag_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    patching._logged.clear()
    cfg = vllm_config({"indexer_epilog": {"quant_mode": "mx"}})
    wrapped = model_build._wrap(lambda vllm_config, prefix="": object())
    with caplog.at_level(logging.INFO, logger="vllm_indexer_epilog"):
        wrapped(vllm_config=cfg)
        wrapped(vllm_config=cfg)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "no hooked site" in r.getMessage()]
    assert len(warnings) == 1 and "DeepseekV4ForCausalLM" in warnings[0].getMessage()


def test_served_model_logs_its_mode_line_once(caplog: pytest.LogCaptureFixture) -> None:
    patching._logged.clear()
    seen: list[EpilogConfig] = []
    remove = model_build.add_site(lambda model, config: (seen.append(config), "test site")[1])
    try:
        wrapped = model_build._wrap(lambda vllm_config, prefix="": object())
        cfg = vllm_config({"indexer_epilog": {"quant_mode": "mx", "round_scale": False, "fp8_dtype": "float8_e5m2"}})
        with caplog.at_level(logging.INFO, logger="vllm_indexer_epilog"):
            wrapped(vllm_config=cfg)
            wrapped(vllm_config=cfg)
    finally:
        remove()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("indexer_epilog: test site")]
    assert lines == ["indexer_epilog: test site: mode=mx round_scale=false fp8=float8_e5m2"]
    assert seen[0].quant_mode == 0 and not seen[0].round_scale


def test_nested_builds_check_once() -> None:
    calls = []
    inner = model_build._wrap(lambda vllm_config, prefix="": calls.append("inner"))
    outer = model_build._wrap(lambda vllm_config, prefix="": (inner(vllm_config=vllm_config), calls.append("outer")))
    outer(vllm_config=vllm_config())
    assert calls == ["inner", "outer"]
