"""Each class of bad input raises an error naming the argument, and leaves cache and scale bytes as they were."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from helpers import BACKENDS, as_bytes, poisoned, random_x

T, D, N = 6, 200, 10


def good_args(device: str, quant_mode: int = 1) -> dict:
    cache, scale = poisoned(N, D, torch.float8_e4m3fn, quant_mode, seed=3, device=device)
    return {
        "cache": cache,
        "scale": scale,
        "x": random_x(T, D, torch.bfloat16, seed=4, device=device),
        "slot_mapping": torch.tensor([0, 3, -1, 9, 5, 1], dtype=torch.int32, device=device),
        "quant_mode": quant_mode,
        "round_scale": True,
    }


def _set(key: str, make: Callable[[dict], object]) -> Callable[[dict], None]:
    def mutate(a: dict) -> None:
        a[key] = make(a)

    return mutate


def _bytes_as(t: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous `dtype` view of `t`'s bytes from byte `offset`: an argument aliasing `t`."""
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return t.view(torch.uint8).reshape(-1)[offset:offset + n].view(dtype).view(shape)


def _cache_and_scale_sharing(a: dict, overlap: int) -> None:
    """Contiguous cache and scale in one buffer, the scale starting `overlap` bytes before the cache ends."""
    buf = torch.zeros(N * D + N * 2 * 4, dtype=torch.uint8, device=a["cache"].device)
    a["cache"] = buf[: N * D].view(torch.float8_e4m3fn).view(N, D)
    a["scale"] = buf[N * D - overlap: N * D - overlap + N * 2 * 4].view(torch.float32).view(N, 2)


# (case id, mutation of good arguments, words the message must contain, exception type)
CASES = [
    ("x_dtype", _set("x", lambda a: a["x"].to(torch.float64)), "x must have dtype", TypeError),
    ("x_int", _set("x", lambda a: a["x"].to(torch.int32)), "x must have dtype", TypeError),
    ("cache_dtype", _set("cache", lambda a: a["cache"].view(torch.uint8)), "indexer_compress_cache must have dtype", TypeError),
    ("scale_dtype_for_mode", _set("quant_mode", lambda a: 0), "indexer_compress_scale must have dtype", TypeError),
    ("scale_bf16", _set("scale", lambda a: a["scale"].to(torch.bfloat16)), "indexer_compress_scale must have dtype", TypeError),
    ("quant_mode_3", _set("quant_mode", lambda a: 3), "quant_mode must be 0", ValueError),
    # HiFloat8 (quant_mode=2) takes a uint8 cache and float32 scales; fp8 caches are modes 0/1 only.
    ("hif8_fp8_cache", _set("quant_mode", lambda a: 2), "indexer_compress_cache must have dtype uint8", TypeError),
    ("quant_mode_neg", _set("quant_mode", lambda a: -1), "quant_mode must be 0", ValueError),
    ("slot_dtype", _set("slot_mapping", lambda a: a["slot_mapping"].to(torch.int16)), "slot_mapping must have dtype", TypeError),
    ("slot_float", _set("slot_mapping", lambda a: a["slot_mapping"].float()), "slot_mapping must have dtype", TypeError),
    ("cache_noncontig", _set("cache", lambda a: a["cache"].view(torch.uint8).repeat(1, 2)[:, ::2].view(torch.float8_e4m3fn)),
     "indexer_compress_cache must be contiguous", ValueError),
    ("scale_noncontig", _set("scale", lambda a: a["scale"].repeat(1, 2)[:, ::2]), "indexer_compress_scale must be contiguous", ValueError),
    ("x_noncontig", _set("x", lambda a: a["x"].repeat(1, 2)[:, ::2]), "x must be contiguous", ValueError),
    ("slots_noncontig", _set("slot_mapping", lambda a: a["slot_mapping"].repeat(2)[::2]), "slot_mapping must be contiguous", ValueError),
    ("d_mismatch", _set("x", lambda a: random_x(T, D + 1, torch.bfloat16, seed=1, device=a["x"].device.type)),
     "indexer_compress_cache must have shape", ValueError),
    ("g_mismatch", _set("scale", lambda a: torch.zeros(N, 3, dtype=torch.float32, device=a["x"].device)),
     "indexer_compress_scale must have shape", ValueError),
    ("rows_mismatch", _set("scale", lambda a: torch.zeros(N + 1, 2, dtype=torch.float32, device=a["x"].device)),
     "indexer_compress_scale has 11 rows but indexer_compress_cache has 10", ValueError),
    ("slots_len", _set("slot_mapping", lambda a: a["slot_mapping"][:-1].contiguous()), "slot_mapping must have one element per row", ValueError),
    ("d_zero", _set("x", lambda a: torch.zeros(T, 0, dtype=torch.bfloat16, device=a["x"].device)), "d >= 1", ValueError),
    # Through the dispatcher, torch's own schema check answers first (RuntimeError naming argument 'x').
    ("x_not_tensor", _set("x", lambda a: [[1.0]]), "x must be a torch.Tensor|for argument 'x'", (TypeError, RuntimeError)),
    # Aliasing: an output sharing bytes with another argument (SPEC "Aliasing"); the later argument is named.
    ("scale_in_cache", _set("scale", lambda a: _bytes_as(a["cache"], 0, torch.float32, (N, 2))),
     "indexer_compress_scale overlaps indexer_compress_cache", ValueError),
    ("scale_overlaps_cache_tail", lambda a: _cache_and_scale_sharing(a, overlap=40),
     "indexer_compress_scale overlaps indexer_compress_cache", ValueError),
    ("cache_in_x", _set("cache", lambda a: _bytes_as(a["x"], 0, torch.float8_e4m3fn, (N, D))),
     "x overlaps indexer_compress_cache", ValueError),
    ("scale_in_x", _set("scale", lambda a: _bytes_as(a["x"], 400, torch.float32, (N, 2))),
     "x overlaps indexer_compress_scale", ValueError),
    ("slots_in_cache", _set("slot_mapping", lambda a: _bytes_as(a["cache"], 8, torch.int32, (T,))),
     "slot_mapping overlaps indexer_compress_cache", ValueError),
    ("slots_in_scale", _set("slot_mapping", lambda a: _bytes_as(a["scale"], 0, torch.int32, (T,))),
     "slot_mapping overlaps indexer_compress_scale", ValueError),
]

SLOT_RANGE_CASES = [
    ("slot_too_big", [0, 3, -1, 10, 5, 1]),
    ("slot_below_minus_one", [0, 3, -2, 9, 5, 1]),
    ("slot_huge", [0, 3, -1, 2**40, 5, 1]),
]


def _call(fn: Callable[..., None], a: dict) -> None:
    fn(a["cache"], a["scale"], a["x"], a["slot_mapping"], quant_mode=a["quant_mode"], round_scale=a["round_scale"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_named_and_nothing_written(case, backend) -> None:
    _, fn, device = backend
    _, mutate, words, exc = case
    a = good_args(device)
    mutate(a)
    before = (as_bytes(a["cache"]).copy(), as_bytes(a["scale"]).copy())
    with pytest.raises(exc, match=words):
        _call(fn, a)
    np.testing.assert_array_equal(as_bytes(a["cache"]), before[0])
    np.testing.assert_array_equal(as_bytes(a["scale"]), before[1])


@pytest.mark.parametrize("slots", [c[1] for c in SLOT_RANGE_CASES], ids=[c[0] for c in SLOT_RANGE_CASES])
@pytest.mark.parametrize("name", ["cpu_kernel", "reference"])
def test_cpu_rejects_slots_out_of_range_before_writing(slots, name) -> None:
    fn, device = BACKENDS[name]
    a = good_args(device)
    a["slot_mapping"] = torch.tensor(slots, dtype=torch.int64)
    before = (as_bytes(a["cache"]).copy(), as_bytes(a["scale"]).copy())
    with pytest.raises(ValueError, match=r"slot_mapping values must lie in \[-1, 10\)"):
        _call(fn, a)
    np.testing.assert_array_equal(as_bytes(a["cache"]), before[0])
    np.testing.assert_array_equal(as_bytes(a["scale"]), before[1])


def test_mixed_devices_named() -> None:
    a = good_args("cpu")
    a["slot_mapping"] = a["slot_mapping"].to("meta")
    with pytest.raises(ValueError, match="slot_mapping is on meta but x is on cpu"):
        from vllm_indexer_epilog.op.validation import validate_epilog_args

        validate_epilog_args(a["cache"], a["scale"], a["x"], a["slot_mapping"], 1, True)


# Entry points a Python caller can reach with Python values: each must refuse bad outputs and bad options
# before writing. The compiled CPU kernel behind torch.ops is covered by tests/backends/test_cpu_native.py.
def _public(*args: object, **kwargs: object) -> None:
    from vllm_indexer_epilog import indexer_compress_epilog

    indexer_compress_epilog(*args, **kwargs)


def _npu_split(*args: object, **kwargs: object) -> None:
    from vllm_indexer_epilog.backends.npu import write_split

    write_split(*args, **kwargs)


ENTRY_POINTS = {"public_wrapper": _public, "reference": BACKENDS["reference"][0], "npu_write_split": _npu_split}
if "triton" in BACKENDS:
    ENTRY_POINTS["triton"] = BACKENDS["triton"][0]


def _inference_copy(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


OUTPUT_CASES = [
    ("cache_requires_grad", "cache", lambda t: t.requires_grad_(), "indexer_compress_cache must not require grad"),
    ("scale_requires_grad", "scale", lambda t: t.requires_grad_(), "indexer_compress_scale must not require grad"),
    ("cache_inference", "cache", _inference_copy, "indexer_compress_cache is an inference tensor"),
    ("scale_inference", "scale", _inference_copy, "indexer_compress_scale is an inference tensor"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
@pytest.mark.parametrize("quant_mode", [0, 1])
def test_unwritable_outputs_refused_before_writing(entry, case, quant_mode) -> None:
    """requires_grad and inference tensors used outside inference mode: refused up front, on every entry
    (torch would otherwise refuse the in-place write only after some backends had written part of it)."""
    _, key, make, words = case
    a = good_args("cpu", quant_mode)
    a[key] = make(a[key])
    before = (as_bytes(a["cache"]).copy(), as_bytes(a["scale"]).copy())
    with pytest.raises(ValueError, match=words):
        _call(ENTRY_POINTS[entry], a)
    np.testing.assert_array_equal(as_bytes(a["cache"]), before[0])
    np.testing.assert_array_equal(as_bytes(a["scale"]), before[1])


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_inference_tensors_are_fine_inside_inference_mode(entry) -> None:
    a = good_args("cpu")
    with torch.inference_mode():
        a["cache"], a["scale"] = a["cache"].clone(), a["scale"].clone()
        before = as_bytes(a["cache"]).copy()
        _call(ENTRY_POINTS[entry], a)
    assert (as_bytes(a["cache"]) != before).any()


OPTION_CASES = [
    ("round_scale_none", {"round_scale": None}, TypeError, "round_scale must be a bool"),
    ("round_scale_zero", {"round_scale": 0}, TypeError, "round_scale must be a bool"),
    ("round_scale_one", {"round_scale": 1}, TypeError, "round_scale must be a bool"),
    ("quant_mode_true", {"quant_mode": True}, ValueError, "quant_mode must be 0"),
    ("quant_mode_float", {"quant_mode": 1.0}, ValueError, "quant_mode must be 0"),
    ("quant_mode_none", {"quant_mode": None}, ValueError, "quant_mode must be 0"),
]
# HiFloat8's `scale` keyword: a finite float, and 1.0 outside quant_mode=2. Not for torch.ops under our schema,
# which has no such argument (the dispatcher refuses the keyword itself).
SCALE_CASES = [
    ("scale_str", {"scale": "2"}, TypeError, "scale must be a float"),
    ("scale_bool", {"scale": True}, TypeError, "scale must be a float"),
    ("scale_none", {"scale": None}, TypeError, "scale must be a float"),
    ("scale_nan", {"scale": float("nan")}, ValueError, "scale must be finite"),
    ("scale_inf", {"scale": float("-inf")}, ValueError, "scale must be finite"),
    ("scale_float32_overflow", {"scale": 1e39}, ValueError, "scale must be finite"),
    ("scale_in_standard_mode", {"scale": 2.0}, ValueError, "scale must be 1.0 unless quant_mode=2"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS) + ["npu_write_packed"])
@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_options_of_the_wrong_type_refused(entry, case) -> None:
    _, options, exc, words = case
    a = good_args("cpu")
    a.update(options)
    before = (as_bytes(a["cache"]).copy(), as_bytes(a["scale"]).copy())
    with pytest.raises(exc, match=words):
        if entry == "npu_write_packed":
            from vllm_indexer_epilog.backends.npu import write_packed

            # Options are checked before the layout, so plain tensors do here.
            write_packed(a["cache"], a["scale"], a["x"], a["slot_mapping"],
                         quant_mode=a["quant_mode"], round_scale=a["round_scale"])
        else:
            _call(ENTRY_POINTS[entry], a)
    np.testing.assert_array_equal(as_bytes(a["cache"]), before[0])
    np.testing.assert_array_equal(as_bytes(a["scale"]), before[1])


def _hif8_args() -> dict:
    a = good_args("cpu")
    a["cache"] = a["cache"].view(torch.uint8)
    a["quant_mode"] = 2
    return a


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS) + ["npu_write_packed"])
@pytest.mark.parametrize("case", SCALE_CASES, ids=[c[0] for c in SCALE_CASES])
def test_bad_scale_refused_by_name(entry, case) -> None:
    _, options, exc, words = case
    a = good_args("cpu") if case[0] == "scale_in_standard_mode" else _hif8_args()
    before = (as_bytes(a["cache"]).copy(), as_bytes(a["scale"]).copy())
    with pytest.raises(exc, match=words):
        if entry == "npu_write_packed":
            from vllm_indexer_epilog.backends.npu import write_packed

            write_packed(a["cache"], a["scale"], a["x"], a["slot_mapping"], quant_mode=a["quant_mode"],
                         round_scale=a["round_scale"], **options)
        else:
            ENTRY_POINTS[entry](a["cache"], a["scale"], a["x"], a["slot_mapping"], quant_mode=a["quant_mode"],
                                round_scale=a["round_scale"], **options)
    np.testing.assert_array_equal(as_bytes(a["cache"]), before[0])
    np.testing.assert_array_equal(as_bytes(a["scale"]), before[1])


def test_torch_ops_converts_options_silently() -> None:
    """Why README sends Python callers to the public wrapper: torch's argument parser turns round_scale=None
    into False and quant_mode=True into 1 before any kernel of ours runs, so those calls succeed there
    (as MX-floor and standard writes) while the wrapper above refuses them."""
    a = good_args("cpu", quant_mode=0)
    want_c, want_s = a["cache"].clone(), a["scale"].clone()
    torch.ops.custom.indexer_compress_epilog(want_c, want_s, a["x"], a["slot_mapping"], quant_mode=0, round_scale=False)
    torch.ops.custom.indexer_compress_epilog(a["cache"], a["scale"], a["x"], a["slot_mapping"], quant_mode=0,
                                             round_scale=None)
    np.testing.assert_array_equal(as_bytes(a["cache"]), as_bytes(want_c))
    np.testing.assert_array_equal(as_bytes(a["scale"]), as_bytes(want_s))


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("key", "value", "name"),
    [
        ("x", [[1.0] * D] * T, "x"),
        ("x", np.zeros((T, D), dtype=np.float32), "x"),
        ("x", None, "x"),
        ("cache", np.zeros((N, D), dtype=np.uint8), "indexer_compress_cache"),
        ("scale", [0.0] * 20, "indexer_compress_scale"),
        ("slot_mapping", [0, 3, -1, 9, 5, 1], "slot_mapping"),
    ],
    ids=["x_list", "x_numpy", "x_none", "cache_numpy", "scale_list", "slots_list"],
)
def test_non_tensor_arguments_named(entry, key, value, name) -> None:
    """The wrapper used to answer `'list' object has no attribute 'device'` for x."""
    a = good_args("cpu")
    a[key] = value
    with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor"):
        _call(ENTRY_POINTS[entry], a)


def _packed(nb: int = 3, bs: int = 4, d: int = 128, pad: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed-block buffer ([bs*d fp8 values][bs*G float32 scales][pad] per block) and its two views."""
    page = bs * d + bs * 4 + pad
    raw = torch.zeros(nb * page + 4096, dtype=torch.uint8)
    values = torch.as_strided(raw.view(torch.float8_e4m3fn), (nb, bs, d), (page, d, 1), 0)
    scales = torch.as_strided(raw.view(torch.float32), (nb, bs, 1), (page // 4, 1, 1), bs * d // 4)
    return raw, values, scales


PACKED_ENTRIES = {"reference": BACKENDS["reference"][0], "cpu_kernel": BACKENDS["cpu_kernel"][0]}


@pytest.mark.parametrize("entry", sorted(PACKED_ENTRIES))
def test_packed_pair_shares_storage_legitimately(entry) -> None:
    raw, values, scales = _packed()
    x = random_x(5, 128, torch.bfloat16, seed=1)
    _call(PACKED_ENTRIES[entry], {"cache": values, "scale": scales, "x": x,
                                  "slot_mapping": torch.tensor([0, 5, -1, 11, 6]), "quant_mode": 1, "round_scale": True})
    assert raw.any()


@pytest.mark.parametrize("entry", sorted(PACKED_ENTRIES))
@pytest.mark.parametrize(
    ("where", "name"),
    [("x_in_first_block", "x overlaps indexer_compress_cache"), ("x_in_padding", "x overlaps indexer_compress_cache"),
     ("slots_in_scales", "slot_mapping overlaps indexer_compress_cache")],
)
def test_packed_pair_aliasing_refused(entry, where, name) -> None:
    """Only the two views may share the page; anything else inside the pair's bytes is refused by name."""
    d = 32 if where == "x_in_padding" else 128
    raw, values, scales = _packed(d=d)
    page = values.stride(0)
    x, slots = random_x(5, d, torch.bfloat16, seed=1), torch.tensor([0, 5, -1, 11, 6])
    if where == "x_in_first_block":
        x = raw[: x.numel() * 2].view(torch.bfloat16).view(x.shape)
    elif where == "x_in_padding":  # one row in the pad after block 0: between the views, inside their extent
        x, slots = raw[page - 2 * d: page].view(torch.bfloat16).view(1, d), torch.tensor([1])
    else:  # over block 0's scales and pad
        slots = raw[4 * d: 4 * d + 40].view(torch.int64)
    before = raw.clone()
    with pytest.raises(ValueError, match=f"^{name}"):
        _call(PACKED_ENTRIES[entry], {"cache": values, "scale": scales, "x": x, "slot_mapping": slots,
                                      "quant_mode": 1, "round_scale": True})
    assert torch.equal(raw, before)
