"""Bit-level model of cann-recipes-infer's Ascend C `IndexerCompressEpilog` kernel *as written*, and of the
numpy golden of its test, for comparison with docs/SPEC.md. Nothing here ran on an NPU.

Read at hicann/cann-recipes-infer commit fbc225d (2026-08-21), the newest commit of the mirror; the kernel
files last changed in 526c313 (2026-05-22):
  ops/ascendc/src/indexer_compress_epilog/op_kernel/indexer_compress_epilog_base.h
      (VFProcessDynamicBlockQuant = standard, VFProcessDynamicMxFp8Quant = MX, VFProcessHifp8Quant = mode 2)
  ops/ascendc/examples/test_npu_indexer_compress_epilog.py  (dynamic_block_quant, act_quant: the golden)

Written from those files' semantics; no code is shared with them or with the package (SPEC's side of every
comparison is the package's reference, `vllm_indexer_epilog.op.reference.quantize_rows`).

Instruction semantics this model assumes (asc-devkit 9.1.0 MicroAPI; none of it checked on hardware):
- `Cast<float, half|bfloat16>` is the exact widening (every fp16/bf16 value is a float32).
- `Mul`/`Muls`/`Max`/`Maxs`/`Mins`/`Abs`/`ReduceMax` are IEEE float32, round-to-nearest-even, and keep
  subnormals. `ReduceMax`/`Max`/`Maxs` propagate NaN (only the MX branch can see a NaN there).
- `Div` in its default algorithm (`DivSpecificMode{ZEROING, false}`, the INTRINSIC algorithm) is within one
  ulp of the true quotient and flushes to zero (issue 16's reading; the CANN Div page we could read names
  the algorithms, PRECISION_1ULP_FTZ_TRUE among them, but not INTRINSIC's bound): subnormal operands read as signed zero and a subnormal
  quotient becomes signed zero (`ftz=True`; `ftz=False` models an IEEE divide). The tables use the
  correctly rounded quotient (`div_round="nearest"`); `"down"`/`"up"` take the float32 neighbour of the
  true quotient below/above it (a faithful divider's two possible answers; exact quotients stay exact),
  the two adversarial ends of "within one ulp".
- `Cast<fp8, float>` with `CAST_RINT, NO_SAT` (`castTraitF32toFp8Even`) rounds to nearest-even, produces fp8
  subnormals, and does not saturate: a magnitude that rounds past FMAX becomes e5m2 Inf (0x7C) or
  e4m3fn NaN (0x7F), sign kept; NaN becomes 0x7F with its sign. The kernel sets control register 60
  (FLOAT_OVERFLOW_MODE_CTRL) to 0; the model takes NO_SAT at its word.
- `Cast<uint8, uint32>` with `CAST_NONE, NO_SAT` (the e8m0 scale store) keeps the low 8 bits.
- The masked `Abs` of the standard branch zeroes the lanes it skips (MicroAPI's ZEROING default), so its
  amax is over the finite elements.

HiFloat8 (quant_mode=2, `VFProcessHifp8Quant`) is described, not modelled: codes = `Cast<hifloat8, float>`
(`CAST_ROUND` = round half away from zero, `SAT`) of fl32(x) * fl32(scale attribute); no amax, no group scale.
Its scale tensor is still copied out from a UB buffer the branch never writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 128


@dataclass(frozen=True)
class Fmt:
    """An fp8 format as the kernel and golden see it."""

    name: str
    mantissa_bits: int
    bias: int
    fmax: float
    inv_fmax_bits: int  # the kernel's constant (standard mode), also fl(1.0f / FMAX) (MX mode)

    @property
    def inv_fmax(self) -> np.float32:
        return np.array([self.inv_fmax_bits], dtype=np.uint32).view(np.float32)[0]


E4M3FN = Fmt("float8_e4m3fn", 3, 7, 448.0, 0x3B124925)
E5M2 = Fmt("float8_e5m2", 2, 15, 57344.0, 0x37924925)
FORMATS = {f.name: f for f in (E4M3FN, E5M2)}

_MIN_NORMAL = np.float32(2.0**-126)
MX_FLOOR = np.float32(1e-4)  # the kernel's `static_cast<float>(1e-4)`


def widen(bits16: np.ndarray, x_dtype: str) -> np.ndarray:
    """fp16 or bf16 bit patterns (uint16) -> float32, exactly."""
    if x_dtype == "bfloat16":
        return (bits16.astype(np.uint32) << 16).view(np.float32)
    if x_dtype == "float16":
        return bits16.view(np.float16).astype(np.float32)
    raise ValueError(f"x dtype {x_dtype!r}: the kernel takes float16 or bfloat16")


def encode_fp8(q: np.ndarray, fmt: Fmt, *, saturate: bool) -> np.ndarray:
    """Round-to-nearest-even of float32 `q` into `fmt`; uint8 codes.

    `saturate=False` is the kernel's NO_SAT cast (past FMAX: e5m2 Inf, e4m3fn NaN); `saturate=True`
    clamps to the largest finite code. NaN -> 0x7F with q's sign.
    """
    q = np.asarray(q, dtype=np.float32)
    sign = ((q.view(np.uint32) >> 31).astype(np.uint8)) << 7
    v = np.abs(q.astype(np.float64))
    nan = np.isnan(v)
    v = np.where(nan | np.isinf(v), 0.0, v)
    m, bias = fmt.mantissa_bits, fmt.bias
    # Step of the fp8 grid at v: 2^(e - m) with e = max(floor(log2 v), 1 - bias). Scaling by a power of two
    # and np.rint (ties to even) round exactly in float64.
    _, e2 = np.frexp(np.where(v > 0, v, 1.0))
    e = np.maximum(e2 - 1, 1 - bias)
    steps = np.rint(np.ldexp(v, m - e))  # in [0, 2^(m+1)]
    r = np.ldexp(steps, e - m)  # the rounded magnitude
    _, re2 = np.frexp(np.where(r > 0, r, 1.0))
    re = re2 - 1
    normal = r >= 2.0 ** (1 - bias)
    code_normal = ((re + bias) << m) + (np.ldexp(r, m - re).astype(np.int64) - (1 << m))
    code = np.where(normal, code_normal, steps.astype(np.int64))
    over = (r > fmt.fmax) | np.isinf(np.abs(q))
    max_code = 0x7E if fmt is E4M3FN else 0x7B
    overflow_code = max_code if saturate else (0x7F if fmt is E4M3FN else 0x7C)
    code = np.where(over, overflow_code, code)
    code = np.where(nan, 0x7F, code)
    return code.astype(np.uint8) | sign


def _flush(v: np.ndarray) -> np.ndarray:
    """Subnormal float32 -> zero of the same sign."""
    return np.where(np.abs(v) < _MIN_NORMAL, np.copysign(np.float32(0), v), v).astype(np.float32)


def div(x: np.ndarray, s: np.ndarray, *, ftz: bool = True, div_round: str = "nearest") -> np.ndarray:
    """The kernel's float32 `Div` (see the module docstring for the assumptions)."""
    x = np.asarray(x, dtype=np.float32)
    s = np.asarray(s, dtype=np.float32)
    if ftz:
        x, s = _flush(x), _flush(s)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        # x/s of two float32 is either a float32 or at least ~2^-49 (relative) away from every float32, so
        # the float64 quotient decides exactness and rounds to the correctly rounded float32 quotient.
        q64 = x.astype(np.float64) / s.astype(np.float64)
        q = q64.astype(np.float32)
    if div_round != "nearest":
        inexact = np.isfinite(q64) & (q.astype(np.float64) != q64)
        if div_round == "down":
            wrong_side = q.astype(np.float64) > q64
            toward = np.float32(-np.inf)
        elif div_round == "up":
            wrong_side = q.astype(np.float64) < q64
            toward = np.float32(np.inf)
        else:
            raise ValueError(f"div_round={div_round!r}: nearest, down or up")
        q = np.where(inexact & wrong_side, np.nextafter(q, toward), q).astype(np.float32)
    return _flush(q) if ftz else q


def _groups(x: np.ndarray) -> np.ndarray:
    t, d = x.shape
    pad = -d % GROUP
    return np.pad(x, ((0, 0), (0, pad))).reshape(t, -1, GROUP), d


def kernel_standard(
    x16: np.ndarray, x_dtype: str, fmt: Fmt, *, ftz: bool = True, div_round: str = "nearest"
) -> tuple[np.ndarray, np.ndarray]:
    """quant_mode=1 as VFProcessDynamicBlockQuant computes it: uint8 codes [T, d], float32 scales [T, G].

    amax over finite elements (0 if none); S = amax * fl(1/FMAX) where amax != 0; q = Div(x, S); a
    non-finite q keeps x (so S = 0 or, under FTZ, a subnormal S passes x itself to the cast); NO_SAT cast.
    """
    xg, d = _groups(widen(x16, x_dtype))
    finite = np.isfinite(xg)
    amax = np.where(finite, np.abs(xg), np.float32(0)).max(axis=-1)
    s = np.where(amax != 0, amax * fmt.inv_fmax, amax).astype(np.float32)
    q = div(xg, s[..., None], ftz=ftz, div_round=div_round)
    q = np.where(np.isfinite(q), q, xg)
    codes = encode_fp8(q, fmt, saturate=False)
    return codes.reshape(len(x16), -1)[:, :d], s


def kernel_mx_scale_bits(amax: np.ndarray, fmt: Fmt, round_scale: bool) -> np.ndarray:
    """The MX branch's float32 scale (as uint32 bits) from the group amax (float32)."""
    a = np.maximum(amax.astype(np.float32), MX_FLOOR)  # np.maximum propagates NaN, as assumed of Maxs
    m = (a * np.float32(np.float32(1.0) / np.float32(fmt.fmax))).astype(np.float32).view(np.uint32)
    if not round_scale:
        return m
    exp = (m >> np.uint32(23)) & np.uint32(0xFF)
    # The kernel ANDs the already-extracted 8-bit exponent with the 23-bit mantissa mask, so its "mantissa
    # is non-zero" test reads the exponent: every normal value is bumped, exact powers of two included.
    bump = ((exp & np.uint32(0x7FFFFF)) != 0).astype(np.uint32)
    return ((exp + bump) << np.uint32(23)).astype(np.uint32)  # (exp - 127 + bump) + 127, shifted back


def kernel_mx(
    x16: np.ndarray, x_dtype: str, fmt: Fmt, round_scale: bool, *, ftz: bool = True, div_round: str = "nearest"
) -> tuple[np.ndarray, np.ndarray]:
    """quant_mode=0 as VFProcessDynamicMxFp8Quant computes it: uint8 codes [T, d], e8m0 bytes [T, G]."""
    xg, d = _groups(widen(x16, x_dtype))
    amax = np.abs(xg).max(axis=-1)  # no finite mask in this branch
    s_bits = kernel_mx_scale_bits(amax, fmt, round_scale)
    q = div(xg, s_bits.view(np.float32)[..., None], ftz=ftz, div_round=div_round)
    q = np.minimum(np.maximum(q, np.float32(-fmt.fmax)), np.float32(fmt.fmax))
    codes = encode_fp8(q, fmt, saturate=False)
    scale_bytes = ((s_bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.uint8)
    return codes.reshape(len(x16), -1)[:, :d], scale_bytes


def _golden_finish(q: np.ndarray, x: np.ndarray, fmt: Fmt) -> np.ndarray:
    """The golden's common tail: non-finite x kept, clip to +-FMAX, round to 8 decimals, NaN -> 0, cast."""
    bad = ~np.isfinite(x)
    q = np.where(bad, x, q).astype(np.float32)
    q = np.clip(q, np.float32(-fmt.fmax), np.float32(fmt.fmax))
    # numpy >= 2 (NEP 50): np.round on float32 with decimals=8 multiplies by fl32(1e8), rints, divides back,
    # all in float32; that moves values (ties included) before the cast. Reproduced, not re-derived.
    q = np.round(q, 8)
    q = np.nan_to_num(q, nan=0.0)  # no Inf is left after the clip
    return encode_fp8(q, fmt, saturate=False)  # ml_dtypes' astype: nearest-even, after the clip


def _golden_amax(xg: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(xg), np.abs(xg), np.float32(0)).max(axis=-1).astype(np.float32)


def golden_standard(x16: np.ndarray, x_dtype: str, fmt: Fmt) -> tuple[np.ndarray, np.ndarray]:
    """dynamic_block_quant of the test: S = fl32(amax / FMAX) (amax over finite elements), q = fl32(x / S)."""
    xg, d = _groups(widen(x16, x_dtype))
    s = (_golden_amax(xg) / np.float32(fmt.fmax)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (np.where(np.isfinite(xg), xg, 0) / s[..., None]).astype(np.float32)
    codes = _golden_finish(q, xg, fmt)
    return codes.reshape(len(x16), -1)[:, :d], s


def golden_mx(x16: np.ndarray, x_dtype: str, fmt: Fmt, round_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """act_quant of the test: no amax floor; round_scale = 2^ceil(log2) with a correct mantissa test."""
    xg, d = _groups(widen(x16, x_dtype))
    s = (_golden_amax(xg) / np.float32(fmt.fmax)).astype(np.float32)
    bits = s.view(np.uint32)
    if round_scale:
        exp = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int64)
        up = ((bits & np.uint32(0x7FFFFF)) != 0).astype(np.int64)
        # 2^(exp - 127 + up) built from bits; exp = up = 0 (S = 0) gives the bits 0, i.e. 0.0.
        bits = (((exp - 127 + up) + 127) << 23).astype(np.uint32)
        s = bits.view(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (np.where(np.isfinite(xg), xg, 0) / s[..., None]).astype(np.float32)
    codes = _golden_finish(q, xg, fmt)
    return codes.reshape(len(x16), -1)[:, :d], (bits >> np.uint32(23)).astype(np.uint8)


def kernel(x16: np.ndarray, x_dtype: str, fmt: Fmt, quant_mode: int, round_scale: bool = True, **kw):
    """Dispatch like the kernel's tiling key: quant_mode 1 standard, 0 MX (2, HiFloat8, is not modelled)."""
    if quant_mode == 1:
        return kernel_standard(x16, x_dtype, fmt, **kw)
    if quant_mode == 0:
        return kernel_mx(x16, x_dtype, fmt, round_scale, **kw)
    raise NotImplementedError("quant_mode=2 (HiFloat8) is described in the module docstring, not modelled")


def golden(x16: np.ndarray, x_dtype: str, fmt: Fmt, quant_mode: int, round_scale: bool = True):
    if quant_mode == 1:
        return golden_standard(x16, x_dtype, fmt)
    if quant_mode == 0:
        return golden_mx(x16, x_dtype, fmt, round_scale)
    raise NotImplementedError("the golden's hifp8_block_quant needs a HiFloat8 encoder; not modelled")
