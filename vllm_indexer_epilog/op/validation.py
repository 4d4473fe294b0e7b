"""Argument checks shared by every backend of the op, run before anything is written.

Metadata checks (`validate_epilog_args`) need no tensor values, so they also run on fake tensors while
tracing. The slot-range check reads values: CPU backends always run it; accelerators run it only in
strict mode (`envs.strict()`) because it costs a device-to-host sync (their kernels skip out-of-range
rows instead). Strict mode also rejects two rows naming one slot, on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import math
import struct

import torch

from .geometry import PackedGeometry, _is_fake, packed_geometry, same_storage
from .spec import (
    FP8_FORMATS,
    HIF8_CACHE_DTYPE,
    QUANT_MODE_HIFLOAT8,
    SCALE_DTYPE_BY_MODE,
    SLOT_DTYPES,
    X_DTYPES,
    Fp8Format,
    num_groups,
)


@dataclass(frozen=True)
class EpilogProblem:
    """The sizes and formats of one validated call."""

    rows: int  # T: rows of x
    geometry: PackedGeometry  # the cache's blocks; contiguous caches are one block of N rows
    fmt: Fp8Format | None  # None in HiFloat8 mode (uint8 cache of HiF8 codes)
    quant_mode: int
    round_scale: bool
    scale: float = 1.0  # the multiplier of HiFloat8 mode, already rounded to float32; 1.0 in modes 0/1

    @property
    def hifloat8(self) -> bool:
        return self.quant_mode == QUANT_MODE_HIFLOAT8

    @property
    def slots(self) -> int:
        """N: rows of the cache and of the scale."""
        return self.geometry.rows

    @property
    def packed(self) -> bool:
        """Whether the cache and scale are the two views of a packed-block buffer (not one contiguous block)."""
        return self.geometry.block_bytes != 0

    @property
    def dim(self) -> int:
        return self.geometry.dim

    @property
    def groups(self) -> int:
        return self.geometry.groups


def _dtype_names(dtypes: tuple[torch.dtype, ...] | list[torch.dtype]) -> str:
    return ", ".join(str(dt).removeprefix("torch.") for dt in dtypes)


def validate_options(quant_mode: object, round_scale: object, scale: object = 1.0) -> float:
    """The keyword arguments, checked before torch's argument parser can convert them; returns `scale`
    rounded to float32 (nearest even), as a Python float.

    Through `torch.ops`, the parser turns `round_scale=None` or `0` into False and `quant_mode=True` into 1
    without complaint; entry points that take Python values (the public wrapper, the reference, Triton,
    NPU) call this first so that those typos are errors rather than a silently different mode.

    `scale` multiplies x in HiFloat8 mode only (Ascend's kernel applies its `scale` attribute in that mode's
    path and nowhere else); modes 0 and 1 derive their own group scales, so any other value there is refused
    rather than silently ignored. It must be finite once rounded to float32: an infinite scale would turn
    every code into Inf or NaN.
    """
    if isinstance(quant_mode, bool) or not isinstance(quant_mode, int) or quant_mode not in SCALE_DTYPE_BY_MODE:
        raise ValueError(
            f"quant_mode must be 0 (MX, e8m0 scales), 1 (standard, float32 scales) or 2 (HiFloat8), got {quant_mode!r}"
        )
    if not isinstance(round_scale, bool):
        raise TypeError(f"round_scale must be a bool, got {round_scale!r} ({type(round_scale).__name__})")
    if isinstance(scale, bool) or not isinstance(scale, (float, int)):
        raise TypeError(f"scale must be a float, got {scale!r} ({type(scale).__name__})")
    try:
        # struct rounds to float32 as a C cast does (nearest even) without a tensor: no device, no sync.
        scale_f32 = struct.unpack("f", struct.pack("f", float(scale)))[0]
    except OverflowError:  # beyond float64 (a huge int), or finite but beyond float32 once rounded
        scale_f32 = math.inf
    if not math.isfinite(scale_f32):
        raise ValueError(f"scale must be finite as a float32, got {scale!r}")
    if quant_mode != QUANT_MODE_HIFLOAT8 and scale != 1.0:
        raise ValueError(
            f"scale must be 1.0 unless quant_mode=2 (HiFloat8): modes 0 and 1 compute their own group scales; "
            f"got {scale!r}"
        )
    return scale_f32


def validate_tensor_types(
    cache: object, scale: object, x: object, slot_mapping: object
) -> tuple[tuple[str, torch.Tensor], ...]:
    """TypeError naming the first argument that is not a torch.Tensor (a list, a numpy array, None, ...);
    the four arguments with their names otherwise."""
    named = (
        ("indexer_compress_cache", cache),
        ("indexer_compress_scale", scale),
        ("x", x),
        ("slot_mapping", slot_mapping),
    )
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return named  # type: ignore[return-value]


def _check_writable(name: str, t: torch.Tensor) -> None:
    """Refuse outputs that an in-place write would corrupt or that torch would refuse after a partial write.

    A cache or scale that requires grad: autograd cannot record this op (it has no derivative), and a
    leaf's in-place update would raise only after some backends had written. An inference tensor used
    outside inference mode: torch refuses in-place updates of it, again only once a kernel tries.
    """
    if t.requires_grad:
        raise ValueError(f"{name} must not require grad (it is written in place; pass a tensor without requires_grad)")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{name} is an inference tensor (made under torch.inference_mode()) and cannot be written outside "
            "inference mode; call the op inside torch.inference_mode() or allocate it outside"
        )


def validate_epilog_args(
    cache: torch.Tensor,
    scale: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    quant_mode: int,
    round_scale: bool,
    *,
    packed: bool | None = None,
    scale_value: object = 1.0,
) -> EpilogProblem:
    """Raise TypeError/ValueError naming the offending argument; return the problem's sizes otherwise.

    The cache and scale are either two contiguous tensors or the two views of a packed-block buffer
    (geometry.py). `packed=None` (the op's contract) tells them apart: both contiguous is the contiguous
    pair; otherwise they must form a packed pair, and when they do not, the first non-contiguous one is
    refused as "must be contiguous" (with the reason they are not a packed pair). `packed=True` insists on
    a packed pair (geometry.py's own errors); `packed=False` insists on contiguous tensors.
    `scale_value` is the op's `scale` keyword (the tensor argument `scale` is indexer_compress_scale).
    """
    scale_f32 = validate_options(quant_mode, round_scale, scale_value)
    named = validate_tensor_types(cache, scale, x, slot_mapping)

    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must have dtype {_dtype_names(X_DTYPES)}, got {x.dtype}")
    fmt = FP8_FORMATS.get(cache.dtype)
    if quant_mode == QUANT_MODE_HIFLOAT8:
        if cache.dtype != HIF8_CACHE_DTYPE:
            raise TypeError(
                f"indexer_compress_cache must have dtype uint8 (HiFloat8 codes) when quant_mode=2, got {cache.dtype}"
            )
    elif fmt is None:
        raise TypeError(f"indexer_compress_cache must have dtype {_dtype_names(list(FP8_FORMATS))}, got {cache.dtype}")
    want_scale = SCALE_DTYPE_BY_MODE[quant_mode]
    if scale.dtype != want_scale:
        raise TypeError(
            f"indexer_compress_scale must have dtype {want_scale} when quant_mode={quant_mode}, got {scale.dtype}"
        )
    if slot_mapping.dtype not in SLOT_DTYPES:
        raise TypeError(f"slot_mapping must have dtype {_dtype_names(SLOT_DTYPES)}, got {slot_mapping.dtype}")

    for name, t in named[:2]:
        _check_writable(name, t)
    for name, t in named[:2] + named[3:]:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share one device")
    detected: PackedGeometry | None = None
    if packed is None:
        packed = not (cache.is_contiguous() and scale.is_contiguous())
        if packed:
            try:
                detected = packed_geometry(cache, scale)
            except ValueError as exc:
                name, t = next((n, t) for n, t in named[:2] if not t.is_contiguous())
                raise ValueError(
                    f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}), or "
                    f"indexer_compress_cache and indexer_compress_scale must be the two views of a packed-block "
                    f"buffer ({exc})"
                ) from None
    for name, t in named[2:] if packed else named:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")

    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., d] with d >= 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    g = num_groups(d)
    if cache.dim() < 1 or cache.shape[-1] != d:
        raise ValueError(f"indexer_compress_cache must have shape [..., d] with d = {d} (from x), got {tuple(cache.shape)}")
    if scale.dim() < 1 or scale.shape[-1] != g:
        raise ValueError(
            f"indexer_compress_scale must have shape [..., G] with G = ceil({d}/128) = {g}, got {tuple(scale.shape)}"
        )
    if detected is not None:
        geometry = detected
    elif packed:
        geometry = packed_geometry(cache, scale)
    else:
        geometry = PackedGeometry(1, cache.numel() // d, d, g, 0)
    n = geometry.rows
    if scale.numel() // g != n:
        raise ValueError(
            f"indexer_compress_scale has {scale.numel() // g} rows but indexer_compress_cache has {n}; they must match"
        )
    t_rows = x.numel() // d
    if slot_mapping.numel() != t_rows:
        raise ValueError(f"slot_mapping must have one element per row of x ({t_rows}), got {slot_mapping.numel()}")
    check_no_aliasing(named, packed_pair=packed)
    return EpilogProblem(t_rows, geometry, fmt, quant_mode, round_scale, scale_f32)


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte of a non-empty tensor: absolute addresses, or storage offsets on meta."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size() if t.device.type == "meta" else t.data_ptr()
    return start, start + span * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or _is_fake(a) or _is_fake(b):  # fake: the real kernel checks
        return False
    if a.device.type == "meta" and not same_storage(a, b):
        return False
    (a0, a1), (b0, b1) = _byte_extent(a), _byte_extent(b)
    return a0 < b1 and b0 < a1


def check_no_aliasing(named: tuple[tuple[str, torch.Tensor], ...], *, packed_pair: bool) -> None:
    """Refuse an output whose bytes (first to last) meet another argument's: the write would change input
    still to be read, or one output would clobber the other, differently per backend. The one exception is
    the packed-block pair, whose two views interleave by design and which packed_geometry() has checked
    to be disjoint element by element. `named`: cache, scale, x, slot_mapping, in that order."""
    outputs = named[:2]
    for i, (out_name, out) in enumerate(outputs):
        for other_name, other in named[i + 1:]:
            if packed_pair and i == 0 and other_name == named[1][0]:
                continue
            if _overlap(out, other):
                raise ValueError(
                    f"{other_name} overlaps {out_name} in memory: {out_name} is written in place, so it must not "
                    "share bytes with another argument"
                )


def check_slot_range(slot_mapping: torch.Tensor, num_slots: int, *, reject_duplicates: bool = False) -> None:
    """Raise ValueError unless every slot lies in [-1, num_slots) (and, optionally, valid slots are unique).

    Reads the values: on an accelerator this synchronizes with the host.
    """
    if slot_mapping.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(slot_mapping.reshape(-1)))
    if lo < -1 or hi >= num_slots:
        raise ValueError(
            f"slot_mapping values must lie in [-1, {num_slots}) (-1 skips a row; {num_slots} cache rows), "
            f"got min {lo} and max {hi}"
        )
    if reject_duplicates:
        valid = slot_mapping.reshape(-1)
        valid = valid[valid >= 0]
        unique, counts = torch.unique(valid, return_counts=True)
        if unique.numel() != valid.numel():
            twice = unique[counts > 1]
            raise ValueError(
                f"slot_mapping names the same cache row twice ({twice.numel()} rows, e.g. slot {int(twice[0])}); "
                "rejected in strict mode (VLLM_INDEXER_EPILOG_STRICT=1)"
            )
