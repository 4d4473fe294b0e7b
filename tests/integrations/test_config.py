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
        ({"quant_mode": "hifloat8"}, (True, 2, True, torch.float8_e4m3fn)),
        ({"quant_mode": 2, "round_scale": False}, (True, 2, False, torch.float8_e4m3fn)),
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
        ({"quant_mode": 3}, "quant_mode"),
        ({"quant_mode": "hif8"}, "quant_mode"),
        ({"quant_mode": "hifloat8", "fp8_dtype": "e5m2"}, "fp8_dtype does not apply"),
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
    assert parse_epilog_config({"quant_mode": "hifloat8"}, "t").describe() == "hifloat8 (HiF8 codes, scale 1.0)"


def test_bundled_flag_examples_parse() -> None:
    import json

    from helpers import ROOT

    files = sorted((ROOT / "configs").glob("indexer-epilog-*.json"))
    assert len(files) == 4
    got = {f.stem: parse_epilog_config(json.loads(f.read_text())["indexer_epilog"], f.name) for f in files}
    assert got["indexer-epilog-mx"].quant_mode == 0 and got["indexer-epilog-standard"] == EpilogConfig(explicit=True)
    assert not got["indexer-epilog-off"].enabled
    assert got["indexer-epilog-hifloat8"].quant_mode == 2 and got["indexer-epilog-hifloat8"].mode_name == "hifloat8"


# ---- reliability: null, non-objects, bounded messages, any input raises the parser's own error ----------

SOURCES = {"model": "model config", "additional": "--additional-config"}


@pytest.mark.parametrize("where", sorted(SOURCES))
@pytest.mark.parametrize("raw", [None, "mx", 1, 0.5, True, [], ["mx"]], ids=repr)
def test_null_and_non_objects_fail_naming_field_and_source(where, raw) -> None:
    """README: a value that is not an object fails start-up. `null` used to pass as "absent"."""
    from types import SimpleNamespace

    hf = SimpleNamespace(indexer_epilog=raw) if where == "model" else SimpleNamespace()
    additional = {"indexer_epilog": raw} if where == "additional" else {}
    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), additional_config=additional)
    with pytest.raises(EpilogConfigError, match="indexer_epilog must be a JSON object") as info:
        epilog_config_from_vllm(cfg)
    assert SOURCES[where] in str(info.value)


def test_null_in_a_dict_hf_config_fails() -> None:
    from types import SimpleNamespace

    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config={"indexer_epilog": None}), additional_config=None)
    with pytest.raises(EpilogConfigError, match="model config.*must be a JSON object, got null"):
        epilog_config_from_vllm(cfg)


def test_absent_key_still_gives_the_defaults() -> None:
    from types import SimpleNamespace

    for hf, additional in (({}, {}), (SimpleNamespace(), None), (None, {"other_plugin": 1})):
        cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), additional_config=additional)
        assert epilog_config_from_vllm(cfg) == EpilogConfig()


@pytest.mark.parametrize(
    "raw",
    [
        {"quant_mode": "x" * 10_000_000},
        {"fp8_dtype": "y" * 10_000_000},
        {"enabled": ["z" * 1000] * 10_000},
        {("k" * 10_000_000): 1},
        "v" * 10_000_000,
    ],
    ids=["quant_mode", "fp8_dtype", "enabled", "key", "whole_value"],
)
def test_messages_quote_a_bounded_prefix(raw) -> None:
    with pytest.raises(EpilogConfigError) as info:
        parse_epilog_config(raw, "model config")
    assert len(str(info.value)) < 600, len(str(info.value))
    assert "model config" in str(info.value)


def _deep(depth: int) -> object:
    value: object = "mx"
    for _ in range(depth):
        value = {"a": [value]}
    return value


@pytest.mark.parametrize(
    "raw",
    [
        {1: "a", "b": 2},  # mixed int/str unknown keys: sorted() used to raise TypeError
        {(1, 2): 1, "quant_mode": "mx"},
        {"quant_mode": _deep(100_000)},  # repr() used to raise RecursionError
        {"round_scale": _deep(100_000)},
        {"fp8_dtype": _deep(100_000)},
        {"quant_mode": ["mx"]},  # unhashable
        {"quant_mode": {"mx": 1}},
    ],
    ids=["mixed_keys", "tuple_key", "deep_quant_mode", "deep_round_scale", "deep_fp8_dtype", "list_mode", "dict_mode"],
)
def test_any_input_raises_the_parsers_own_error(raw) -> None:
    with pytest.raises(EpilogConfigError) as info:
        parse_epilog_config(raw, "model config")
    assert len(str(info.value)) < 600


class _Broken(dict):
    def get(self, *args, **kwargs):  # a Mapping whose methods raise
        raise RuntimeError("boom")

    def __iter__(self):
        raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["additional", "model", "value"])
def test_non_dict_and_broken_configs_raise_the_parsers_error(where) -> None:
    from types import SimpleNamespace

    hf, additional = SimpleNamespace(), {}
    if where == "additional":
        additional = ["not", "an", "object"]  # used to raise AttributeError: 'list' object has no attribute 'get'
    elif where == "model":
        hf = _Broken()
    else:
        additional = {"indexer_epilog": _Broken(quant_mode="mx")}
    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), additional_config=additional)
    with pytest.raises(EpilogConfigError):
        epilog_config_from_vllm(cfg)
