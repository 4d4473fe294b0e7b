"""The `indexer_epilog` model-config flag: parsing, defaults, errors that name the field, two sources."""

from __future__ import annotations

import pytest
import torch

from fakes.ascend_standin import vllm_config
from vllm_indexer_epilog.integrations.config import EpilogConfig, EpilogConfigError, epilog_config_from_vllm, parse_epilog_config


def test_defaults_are_the_ops_defaults() -> None:
    c = epilog_config_from_vllm(vllm_config(None))
    assert c == EpilogConfig() and not c.explicit
    assert (c.enabled, c.quant_mode, c.round_scale, c.fp8_dtype) == (True, 1, True, torch.float8_e4m3fn)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ({"quant_mode": "mx"}, (True, 0, True, torch.float8_e4m3fn)),
        ({"quant_mode": "MX", "round_scale": False}, (True, 0, False, torch.float8_e4m3fn)),
        ({"quant_mode": 1, "fp8_dtype": "e5m2"}, (True, 1, True, torch.float8_e5m2)),
        ({"quant_mode": 0, "fp8_dtype": "torch.float8_e5m2"}, (True, 0, True, torch.float8_e5m2)),
        ({"enabled": False}, (False, 1, True, torch.float8_e4m3fn)),
        ({}, (True, 1, True, torch.float8_e4m3fn)),
    ],
)
def test_values(raw, want) -> None:
    c = parse_epilog_config(raw, "test")
    assert (c.enabled, c.quant_mode, c.round_scale, c.fp8_dtype) == want and c.explicit


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("mx", "must be a JSON object"),
        ({"quant_mode": "fp8"}, "quant_mode"),
        ({"quant_mode": True}, "quant_mode"),
        ({"quant_mode": 1.0}, "quant_mode"),
        ({"quant_mode": 2}, "quant_mode"),
        ({"round_scale": 1}, "round_scale"),
        ({"enabled": "yes"}, "enabled"),
        ({"fp8_dtype": "float8_e4m3fnuz"}, "fp8_dtype"),
        ({"mode": "mx"}, r"unknown indexer_epilog field\(s\) \['mode'\]"),
    ],
)
def test_bad_values_name_the_field_and_source(raw, match) -> None:
    with pytest.raises(EpilogConfigError, match=match) as info:
        parse_epilog_config(raw, "model config")
    assert "model config" in str(info.value)


def test_hf_config_as_a_dict_or_an_object() -> None:
    from types import SimpleNamespace

    for hf in ({"indexer_epilog": {"quant_mode": "mx"}}, SimpleNamespace(indexer_epilog={"quant_mode": "mx"})):
        cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), additional_config=None)
        assert epilog_config_from_vllm(cfg).quant_mode == 0


def test_two_sources_must_agree() -> None:
    cfg = vllm_config({"quant_mode": "mx"})
    cfg.additional_config = {"indexer_epilog": {"quant_mode": "mx"}}
    assert epilog_config_from_vllm(cfg).quant_mode == 0
    cfg.additional_config = {"indexer_epilog": {"quant_mode": "standard"}}
    with pytest.raises(EpilogConfigError, match="differs between the model config"):
        epilog_config_from_vllm(cfg)


def test_describe() -> None:
    assert parse_epilog_config({"quant_mode": "mx", "round_scale": False}, "t").describe() == (
        "mx, round_scale=False, float8_e4m3fn"
    )
    assert EpilogConfig().describe() == "standard, float8_e4m3fn"


def test_bundled_flag_examples_parse() -> None:
    import json

    from helpers import ROOT

    files = sorted((ROOT / "configs").glob("indexer-epilog-*.json"))
    assert len(files) == 3
    got = {f.stem: parse_epilog_config(json.loads(f.read_text())["indexer_epilog"], f.name) for f in files}
    assert got["indexer-epilog-mx"].quant_mode == 0 and got["indexer-epilog-standard"] == EpilogConfig(explicit=True)
    assert not got["indexer-epilog-off"].enabled
