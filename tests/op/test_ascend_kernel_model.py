"""The model of cann-recipes-infer's Ascend kernel and golden (ascend_kernel_model.py), pinned on cases worked
out by hand from the source at fbc225d, one or more per branch; and docs/ascend-kernel.md kept in step with
its generator (`python scripts/gen_ascend_kernel_doc.py` rewrites the tables)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import ascend_kernel_model as M
from helpers import ROOT

E4, E5 = M.E4M3FN, M.E5M2
INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def _ieee_subnormals():
    # The model computes with numpy/torch on the host and needs subnormals kept (see the model's docstring).
    before = torch.set_flush_denormal(False)
    yield
    del before


def group(values: list[float], x_dtype: str = "float16") -> np.ndarray:
    """One 128-element group (uint16 bits) starting with `values` (each exact in x_dtype), zeros after."""
    row = np.zeros((1, M.GROUP), dtype=np.float32)
    row[0, : len(values)] = values
    if x_dtype == "bfloat16":
        return (row.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return row.astype(np.float16).view(np.uint16)


def f32_bits(v) -> int:
    return int(np.asarray(v, dtype=np.float32).view(np.uint32).reshape(-1)[0])


def test_constants_are_the_rounded_reciprocals() -> None:
    assert E4.inv_fmax == np.float32(1) / np.float32(448) and f32_bits(E4.inv_fmax) == 0x3B124925
    assert E5.inv_fmax == np.float32(1) / np.float32(57344) and f32_bits(E5.inv_fmax) == 0x37924925


def test_encoder_rounds_to_even_and_does_not_saturate() -> None:
    q = np.array([464.0, 465.0, 2.0**-9 * 1.5, 2.0**-9 * 2.5, -0.0, INF, -INF, NAN], dtype=np.float32)
    # 464 is the tie between 448 (even mantissa) and 480 (the NaN encoding): stays 448; above it, NaN.
    assert M.encode_fp8(q, E4, saturate=False).tolist() == [0x7E, 0x7F, 0x02, 0x02, 0x80, 0x7F, 0xFF, 0x7F]
    assert M.encode_fp8(q[:2], E4, saturate=True).tolist() == [0x7E, 0x7E]
    q5 = np.array([59392.0, 61440.0, INF, -INF], dtype=np.float32)  # the e5m2 tie 61440 goes to Inf (even)
    assert M.encode_fp8(q5, E5, saturate=False).tolist() == [0x7B, 0x7C, 0x7C, 0xFC]


def test_div_rounding_is_faithful_and_flushes() -> None:
    one, three = np.float32(1), np.float32(3)
    near = f32_bits(M.div(one, three))
    assert near == 0x3EAAAAAB  # 1/3 rounds up to nearest
    assert f32_bits(M.div(one, three, div_round="down")) == near - 1
    assert f32_bits(M.div(one, three, div_round="up")) == near
    assert f32_bits(M.div(np.float32(3), np.float32(2), div_round="down")) == f32_bits(1.5)  # exact stays
    tiny = np.float32(2.0**-127)
    assert M.div(tiny, one) == 0 and M.div(tiny, one, ftz=False) == tiny  # subnormal operand / quotient
    assert np.isinf(M.div(one, tiny)) and M.div(one, tiny, ftz=False) == np.float32(2.0**127)


def test_standard_scale_is_amax_times_the_reciprocal() -> None:
    # 3 * fl(1/448) rounds to 0x3bdb6db8; 3/448 correctly rounded is 0x3bdb6db7 (SPEC and the golden).
    _, ks = M.kernel_standard(group([3.0, 1.0], "bfloat16"), "bfloat16", E4)
    _, gs = M.golden_standard(group([3.0, 1.0], "bfloat16"), "bfloat16", E4)
    assert f32_bits(ks) == 0x3BDB6DB8 and f32_bits(gs) == 0x3BDB6DB7
    # No floor, and an all-zero group keeps S = 0: x / 0 is not finite, so x (0) itself is cast.
    kc, ks = M.kernel_standard(group([0.0]), "float16", E5)
    assert f32_bits(ks) == 0 and not kc.any()


def test_standard_amax_skips_non_finite_and_the_cast_does_not_saturate() -> None:
    kc, ks = M.kernel_standard(group([1.0, INF, -INF, NAN]), "float16", E4)
    assert f32_bits(ks) == 0x3B124925  # amax 1: Inf and NaN ignored
    # Non-finite quotients keep x: Inf -> e4m3fn NaN (no Inf in the format), NaN -> NaN; 1 / S -> 448.
    assert kc[0, :4].tolist() == [0x7E, 0x7F, 0xFF, 0x7F]
    kc, _ = M.kernel_standard(group([1.0, INF, -INF]), "float16", E5)
    assert kc[0, :3].tolist() == [0x7B, 0x7C, 0xFC]  # e5m2 keeps the infinities
    gc, _ = M.golden_standard(group([1.0, INF, -INF, NAN]), "float16", E4)
    assert gc[0, :4].tolist() == [0x7E, 0x7E, 0xFE, 0x00]  # the golden clips, and NaN becomes 0


def test_standard_subnormal_scale_is_flushed_by_div() -> None:
    # amax 2^-120 (bfloat16): S = 2^-120 * fl(1/448) is subnormal; FTZ Div reads it as 0, so x/0 = Inf is not
    # finite and the element keeps x = 2^-120, whose e4m3fn code is 0. An IEEE divide gives 448 (0x7e).
    rows = group([2.0**-120, -(2.0**-121)], "bfloat16")
    kc, ks = M.kernel_standard(rows, "bfloat16", E4)
    assert 0 < f32_bits(ks) < 0x00800000 and kc[0, :2].tolist() == [0x00, 0x80]
    assert M.kernel_standard(rows, "bfloat16", E4, ftz=False)[0][0, 0] == 0x7E


def test_mx_round_bumps_exact_powers_of_two() -> None:
    # 448 * fl(1/448) = 1 exactly; the kernel's mantissa test reads the exponent, so S = 2 (byte 128), and
    # 448 / 2 = 224 is e4m3fn 0x76. The golden's (correct) test keeps S = 1: byte 127, code 0x7e.
    kc, kb = M.kernel_mx(group([448.0]), "float16", E4, True)
    gc, gb = M.golden_mx(group([448.0]), "float16", E4, True)
    assert (int(kb[0, 0]), int(kc[0, 0])) == (128, 0x76)
    assert (int(gb[0, 0]), int(gc[0, 0])) == (127, 0x7E)
    # amax 1: m = fl(1/448) = 1.14 * 2^-9, not a power of two: both rules give 2^-8 (byte 0x77).
    assert int(M.kernel_mx(group([1.0], "bfloat16"), "bfloat16", E4, True)[1][0, 0]) == 0x77


def test_mx_round_differs_from_the_intended_rule_on_142_bf16_and_30_fp16_amax_values() -> None:
    for x_dtype, want in (("bfloat16", 142), ("float16", 30)):
        bits = np.arange(1, 0x8000, dtype=np.uint16)
        a = M.widen(bits, x_dtype)
        a = a[np.isfinite(a)]
        for fmt in (E4, E5):
            as_written = M.kernel_mx_scale_bits(a, fmt, True)
            m = (np.maximum(a, M.MX_FLOOR) * fmt.inv_fmax).astype(np.float32).view(np.uint32)
            exp = (m >> np.uint32(23)) & np.uint32(0xFF)
            intended = (exp + ((m & np.uint32(0x7FFFFF)) != 0)) << np.uint32(23)
            assert int((as_written != intended).sum()) == want, (x_dtype, fmt.name)


def test_mx_floor_and_no_finite_mask() -> None:
    # All-zero group: a = 1e-4, m = 1e-4 * fl(1/57344) = 1.87 * 2^-30, bumped to 2^-29 (byte 0x62).
    kc, kb = M.kernel_mx(group([0.0]), "float16", E5, True)
    assert int(kb[0, 0]) == 0x62 and not kc.any()
    assert int(M.golden_mx(group([0.0]), "float16", E5, True)[1][0, 0]) == 0x00  # the golden has no floor
    # An Inf element: m = Inf, exponent 255 bumped to 256 lands in the sign bit: S = -0.0, byte 0x00; 1.0 and
    # Inf become x / -0 = -Inf, clamped to -448 (0xfe); the zeros become 0 / -0 = NaN.
    kc, kb = M.kernel_mx(group([1.0, INF], "bfloat16"), "bfloat16", E4, True)
    assert int(kb[0, 0]) == 0x00 and kc[0, :2].tolist() == [0xFE, 0xFE] and kc[0, 2] & 0x7F == 0x7F
    # The clamp is what turns -Inf into -FMAX: without it the NO_SAT cast gives e5m2 -Inf (0xfc), here 0xfb.
    kc, _ = M.kernel_mx(group([1.0, INF], "bfloat16"), "bfloat16", E5, True)
    assert kc[0, :2].tolist() == [0xFB, 0xFB] and M.encode_fp8(np.float32(-INF), E5, saturate=False) == 0xFC


def test_mx_without_round_stores_the_exponent_of_an_unrounded_divisor() -> None:
    # m = 1 * fl(1/448) = 1.142857 * 2^-9: byte 127 - 9 = 0x76 (2^-9), but codes are x / m:
    # 0.75 / m = 335.99998 -> 320 (0x7a), 1 / m = 447.99998 -> 448 (0x7e). Decoding 0x7a with the byte
    # gives 320 * 2^-9 = 0.625, not 0.75. The golden does the same.
    kc, kb = M.kernel_mx(group([1.0, 0.75]), "float16", E4, False)
    assert int(kb[0, 0]) == 0x76 and kc[0, :2].tolist() == [0x7E, 0x7A]
    gc, gb = M.golden_mx(group([1.0, 0.75]), "float16", E4, False)
    assert int(gb[0, 0]) == 0x76 and gc[0, :2].tolist() == [0x7E, 0x7A]
    # Below the floor: m = 1e-4 * fl(1/57344) (byte 0x61, 2^-30); 2^-20 / m = 546.8 -> 512 (e5m2 0x60).
    kc, kb = M.kernel_mx(group([2.0**-20]), "float16", E5, False)
    assert int(kb[0, 0]) == 0x61 and kc[0, 0] == 0x60


def test_golden_rounds_to_eight_decimals_before_the_cast() -> None:
    # amax 1.75 -> S = 1.75 / 57344 = 2^-15 exactly; x = 1.25 * 2^-30 gives q = 2.5 * 2^-16, an exact e5m2
    # subnormal tie (nearest-even: 2 * 2^-16, code 0x02). np.round(q, 8) = 3.815e-05 lies above the tie: 0x03.
    rows = group([1.75, 1.25 * 2.0**-30], "bfloat16")
    assert M.golden_standard(rows, "bfloat16", E5)[0][0, 1] == 0x03
    assert M.kernel_standard(rows, "bfloat16", E5)[0][0, 1] == 0x02


def test_hifloat8_is_not_modelled() -> None:
    with pytest.raises(NotImplementedError, match="HiFloat8"):
        M.kernel(group([1.0]), "float16", E4, 2)


def test_committed_doc_matches_its_generator() -> None:
    """Regenerate with: python scripts/gen_ascend_kernel_doc.py"""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_ascend_kernel_doc as gen
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    doc = gen.DOC.read_text()
    assert gen.splice(doc, gen.render()) == doc, "stale: run python scripts/gen_ascend_kernel_doc.py"
